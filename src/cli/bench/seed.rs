//! Seeding: creates the credentials a run reads and writes, or learns their versions.

use super::*;

/// Creates the missing credentials (or, with `--no-seed`, only learns versions), with up
/// to 32 requests in flight.
pub(super) async fn prepare(args: &BenchArgs, target: &Target, value: &Arc<[u8]>) -> Result<(), ClientError> {
    let keys = &target.keys;
    let writes = matches!(args.workload, Workload::Put | Workload::Mixed);
    if args.no_seed && !writes || args.workload == Workload::Miss {
        return Ok(());
    }
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let created = Arc::new(AtomicU64::new(0));
    let workers = args.keys.min(32) as usize;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let mut client = target.clients[w % target.clients.len()].clone();
        let (keys, value, next, created) = (keys.clone(), value.clone(), next.clone(), created.clone());
        let seed = !args.no_seed;
        let timeout = Duration::from_secs_f64(args.request_timeout);
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = keys.names.get(i as usize) else { return Ok::<(), Status>(()) };
                let version = if seed {
                    let put = client.put_credential(proto::PutCredentialRequest {
                        name: name.clone(),
                        value: value.to_vec(),
                        expected_version: Some(0),
                        metadata: None,
                    });
                    match tokio::time::timeout(timeout, put).await {
                        Ok(Ok(r)) => {
                            created.fetch_add(1, Ordering::Relaxed);
                            Some(r.into_inner().version)
                        }
                        Ok(Err(s)) if s.code() == Code::AlreadyExists => None,
                        Ok(Err(s)) => return Err(s),
                        Err(_) => return Err(Status::deadline_exceeded(format!("seeding {name} timed out"))),
                    }
                } else {
                    None
                };
                let version = match (version, writes) {
                    (Some(v), _) => v,
                    (None, false) => continue,
                    (None, true) => {
                        let meta =
                            client.get_credential_metadata(proto::GetCredentialMetadataRequest { name: name.clone() });
                        match tokio::time::timeout(timeout, meta).await {
                            Ok(Ok(m)) => m.into_inner().current_version,
                            Ok(Err(s)) => return Err(s),
                            Err(_) => return Err(Status::deadline_exceeded(format!("reading {name} timed out"))),
                        }
                    }
                };
                keys.versions[i as usize].store(version, Ordering::Relaxed);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(status)) => {
                tasks.abort_all();
                return Err(ClientError::Rpc(Status::new(
                    status.code(),
                    format!("preparing the bench credentials: {}", status.message()),
                )));
            }
            Err(e) => return Err(ClientError::Io(std::io::Error::other(e.to_string()))),
        }
    }
    if !args.json {
        eprintln!(
            "prepared {} credentials under {:?} ({} created) in {:.1} s",
            args.keys,
            args.prefix,
            created.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
