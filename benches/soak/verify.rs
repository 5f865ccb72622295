//! Verification at the end: every acknowledged write read back through both daemons, metrics scraped once.

use super::*;

pub(crate) async fn scrape(metrics_addr: &str) -> String {
    use tokio::io::AsyncReadExt as _;
    let Ok(mut s) = tokio::net::TcpStream::connect(metrics_addr).await else { return String::new() };
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// The sum of every sample of `metric` whose labels contain `filter`.
pub(crate) fn metric_sum(body: &str, metric: &str, filter: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[derive(Default)]
pub(crate) struct Verdict {
    pub(crate) names: usize,
    pub(crate) lost: Vec<String>,
    pub(crate) unreadable: Vec<String>,
    pub(crate) wrong: Vec<String>,
    pub(crate) ahead: usize,
    pub(crate) old_kek_versions: i64,
    pub(crate) kek_states: Vec<(i64, String)>,
}

pub(crate) async fn verify(db_url: &str, run: &Run, bearer: &Bearer, owned: &[Owned]) -> Verdict {
    let mut v = Verdict { names: owned.len(), ..Verdict::default() };
    let pool = sqlx::PgPool::connect(db_url).await.expect("connect to the soak database");
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, current_version FROM credentials WHERE deleted_at IS NULL AND name LIKE 'soak/%'")
            .fetch_all(&pool)
            .await
            .expect("read current versions");
    let current: HashMap<String, u64> = rows.into_iter().map(|(n, c)| (n, c as u64)).collect();
    v.kek_states = sqlx::query_as("SELECT id, state FROM keks ORDER BY id").fetch_all(&pool).await.expect("keks");
    let active = v.kek_states.iter().find(|(_, s)| s == "active").map(|(id, _)| *id).unwrap_or(0);
    v.old_kek_versions = sqlx::query_scalar("SELECT count(*) FROM credential_versions WHERE kek_id <> $1")
        .bind(active)
        .fetch_one(&pool)
        .await
        .expect("count versions under old KEKs");
    pool.close().await;

    let mut expected: HashMap<&str, (u64, Vec<&[u8]>)> = HashMap::new();
    for o in owned {
        let Some(&cur) = current.get(&o.name) else {
            v.lost.push(format!("{}: acknowledged v{}, not in the store", o.name, o.acked_version));
            continue;
        };
        if cur < o.acked_version {
            v.lost.push(format!("{}: acknowledged v{}, store has v{cur}", o.name, o.acked_version));
            continue;
        }
        let values = if cur == o.acked_version {
            vec![o.acked_value.as_slice()]
        } else {
            // A write that failed (outage, restart) but committed before the failure.
            v.ahead += 1;
            o.pending.iter().map(Vec::as_slice).collect()
        };
        if values.is_empty() {
            v.wrong.push(format!(
                "{}: store at v{cur} beyond acknowledged v{} with no write pending",
                o.name, o.acked_version
            ));
        }
        expected.insert(&o.name, (cur, values));
    }

    // Every name's current version through both daemons, and its acknowledged version by
    // number through one of them.
    for slot in &run.slots {
        let mut c = Follow::new(slot.clone(), bearer.clone()).client();
        for chunk in owned.chunks(100) {
            let names: Vec<String> = chunk.iter().map(|o| o.name.clone()).collect();
            let r = c.batch_get_credentials(BatchGetCredentialsRequest { names: names.clone() }).await;
            let results = match r {
                Ok(r) => r.into_inner().results,
                Err(s) => {
                    v.unreadable.push(format!("daemon {}: batch read failed: {s:?}", LABELS[slot.index]));
                    continue;
                }
            };
            for (name, item) in names.iter().zip(results) {
                match item.result {
                    Some(batch_get_result::Result::Credential(got)) => {
                        if let Some((cur, values)) = expected.get(name.as_str()) {
                            if got.version != *cur || !values.contains(&got.value.as_slice()) {
                                v.wrong.push(format!(
                                    "daemon {}: {name} read v{} ({} bytes), store has v{cur}",
                                    LABELS[slot.index],
                                    got.version,
                                    got.value.len()
                                ));
                            }
                        }
                    }
                    Some(batch_get_result::Result::Error(e)) => v.unreadable.push(format!(
                        "daemon {}: {name}: {} {}",
                        LABELS[slot.index],
                        credvault::proto::code_name(Code::from(e.code)),
                        e.message
                    )),
                    None => v.unreadable.push(format!("daemon {}: {name}: empty result", LABELS[slot.index])),
                }
            }
        }
    }
    let mut clients = [
        Follow::new(run.slots[0].clone(), bearer.clone()).client(),
        Follow::new(run.slots[1].clone(), bearer.clone()).client(),
    ];
    for (i, o) in owned.iter().enumerate() {
        let c = &mut clients[i % 2];
        match c.get_credential(GetCredentialRequest { name: o.name.clone(), version: Some(o.acked_version) }).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.value != o.acked_value {
                    v.lost.push(format!("{} v{}: reads back a different value", o.name, o.acked_version));
                }
            }
            Err(s) => v.lost.push(format!(
                "{} v{}: {} {}",
                o.name,
                o.acked_version,
                credvault::proto::code_name(s.code()),
                s.message()
            )),
        }
    }
    v
}
