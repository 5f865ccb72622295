//! Hostile bodies against every RPC of a running daemon (the real binary, its log
//! captured): random bytes as message payloads, and random but well-formed protobuf
//! messages built from the API's own descriptors, so a new RPC is covered without
//! touching this file. Holds: no panic in the log, no UNKNOWN status, the daemon still
//! serves a good read afterwards.
//!
//! The default run is a few seconds; `fuzz_every_rpc_long` (ignored) runs many more cases.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use prost::bytes::{Buf as _, BufMut as _};
use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::helpers::spawn::Binary;
use crate::helpers::{client_over, get, put, Backend, Bearer, TestEnv};

/// Sends and receives message bodies as they are, unparsed.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

#[derive(Debug, Clone)]
struct Rpc {
    path: String,
    input: String,
    server_streaming: bool,
}

/// Every RPC of the API and every message type, by fully qualified name.
fn api() -> (Vec<Rpc>, HashMap<String, DescriptorProto>) {
    let fds = FileDescriptorSet::decode(credvault::proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut rpcs = Vec::new();
    let mut messages = HashMap::new();
    fn add(messages: &mut HashMap<String, DescriptorProto>, scope: &str, d: &DescriptorProto) {
        let name = format!("{scope}.{}", d.name());
        for nested in &d.nested_type {
            add(messages, &name, nested);
        }
        messages.insert(name, d.clone());
    }
    for file in &fds.file {
        let scope = format!(".{}", file.package());
        for d in &file.message_type {
            add(&mut messages, &scope, d);
        }
        if file.package() != "credvault.v1" {
            continue;
        }
        for service in &file.service {
            for m in &service.method {
                assert!(!m.client_streaming(), "client streaming is not fuzzed yet: {}", m.name());
                rpcs.push(Rpc {
                    path: format!("/{}.{}/{}", file.package(), service.name(), m.name()),
                    input: m.input_type().to_owned(),
                    server_streaming: m.server_streaming(),
                });
            }
        }
    }
    (rpcs, messages)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: i32, wire: u64) {
    varint(out, (u64::from(field.unsigned_abs()) << 3) | wire);
}

fn interesting_int(rng: &mut StdRng) -> u64 {
    const EDGES: [u64; 9] =
        [0, 1, 2, 100, u32::MAX as u64, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX - 1, u64::MAX];
    if rng.random_bool(0.6) {
        EDGES[rng.random_range(0..EDGES.len())]
    } else {
        rng.random()
    }
}

/// Strings a caller might send: names that parse, near misses, control characters,
/// non-ASCII, oversized.
fn interesting_string(rng: &mut StdRng) -> String {
    const WORDS: [&str; 14] = [
        "",
        "team-a",
        "team-a/db",
        "fuzz/x",
        "a",
        "*",
        "team-a/*",
        "..",
        "a//b",
        "/",
        "x\0y",
        "\u{1b}[31m",
        "ü/ñ",
        "Bearer",
    ];
    match rng.random_range(0..5) {
        0 | 1 => WORDS[rng.random_range(0..WORDS.len())].to_owned(),
        2 => {
            let n = rng.random_range(1..40);
            (0..n).map(|_| char::from(b"abz09-_./"[rng.random_range(0..9)])).collect()
        }
        3 => {
            let n = rng.random_range(0..30);
            (0..n).map(|_| char::from_u32(rng.random_range(0..0x2_0000)).unwrap_or('\u{fffd}')).collect()
        }
        _ => "n".repeat(rng.random_range(200..3000)),
    }
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

/// A well-formed encoding of a random message of type `name` (unknown types and deep
/// nesting get random bytes, which is still well-formed at the outer level).
fn random_message(rng: &mut StdRng, messages: &HashMap<String, DescriptorProto>, name: &str, depth: u32) -> Vec<u8> {
    let Some(d) = messages.get(name) else { return random_bytes(rng, 16) };
    let mut out = Vec::new();
    // One member (or none) of each real oneof.
    let mut oneofs: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for f in &d.field {
        if let (Some(i), false) = (f.oneof_index, f.proto3_optional()) {
            oneofs.entry(i).or_default().push(f.number());
        }
    }
    let mut chosen = Vec::new();
    for members in oneofs.values() {
        if rng.random_bool(0.8) {
            chosen.push(members[rng.random_range(0..members.len())]);
        }
    }
    for f in &d.field {
        let in_oneof = f.oneof_index.is_some() && !f.proto3_optional();
        if in_oneof && !chosen.contains(&f.number()) {
            continue;
        }
        let count = match f.label() {
            Label::Repeated => rng.random_range(0..4),
            _ if in_oneof => 1,
            _ => usize::from(rng.random_bool(0.7)),
        };
        for _ in 0..count {
            let n = f.number();
            match f.r#type() {
                Type::Int64 | Type::Uint64 | Type::Int32 | Type::Uint32 => {
                    tag(&mut out, n, 0);
                    varint(&mut out, interesting_int(rng));
                }
                Type::Sint32 | Type::Sint64 => {
                    tag(&mut out, n, 0);
                    varint(&mut out, interesting_int(rng));
                }
                Type::Bool => {
                    tag(&mut out, n, 0);
                    varint(&mut out, rng.random_range(0..3));
                }
                Type::Enum => {
                    tag(&mut out, n, 0);
                    varint(&mut out, rng.random_range(-2i64..12) as u64);
                }
                Type::Fixed64 | Type::Sfixed64 | Type::Double => {
                    tag(&mut out, n, 1);
                    out.extend_from_slice(&rng.random::<u64>().to_le_bytes());
                }
                Type::Fixed32 | Type::Sfixed32 | Type::Float => {
                    tag(&mut out, n, 5);
                    out.extend_from_slice(&rng.random::<u32>().to_le_bytes());
                }
                Type::String => {
                    let s = interesting_string(rng);
                    tag(&mut out, n, 2);
                    varint(&mut out, s.len() as u64);
                    out.extend_from_slice(s.as_bytes());
                }
                Type::Bytes => {
                    let b = if rng.random_bool(0.05) { vec![b'x'; 70_000] } else { random_bytes(rng, 64) };
                    tag(&mut out, n, 2);
                    varint(&mut out, b.len() as u64);
                    out.extend_from_slice(&b);
                }
                Type::Message if depth < 4 => {
                    let m = random_message(rng, messages, f.type_name(), depth + 1);
                    tag(&mut out, n, 2);
                    varint(&mut out, m.len() as u64);
                    out.extend_from_slice(&m);
                }
                Type::Message | Type::Group => {}
            }
        }
    }
    out
}

/// Random bytes, plus shapes that trip naive decoders.
fn hostile_bytes(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..8) {
        0 => vec![0xff; rng.random_range(1..16)],            // endless varint
        1 => vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, b'a'], // length far beyond the body
        2 => std::iter::repeat_n([0x0a, 0x80, 0x01], 200).flatten().collect(), // deep nesting
        3 => vec![0x0b, 0x0c],                               // group tags
        _ => random_bytes(rng, 300),
    }
}

/// Sends one body; returns the status code it ended with (OK for a stream that was
/// still open when given up on).
async fn send(channel: Channel, bearer: Option<&Bearer>, rpc: &Rpc, body: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        panic!("channel not ready: {e}");
    }
    let mut req = tonic::Request::new(body);
    if let Some(b) = bearer {
        req.metadata_mut().insert("authorization", b.0.clone());
    }
    let path: http::uri::PathAndQuery = rpc.path.parse().expect("path");
    if !rpc.server_streaming {
        return match grpc.unary::<_, Vec<u8>, _>(req, path, RawCodec).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
    }
    let mut stream = match grpc.server_streaming::<_, Vec<u8>, _>(req, path, RawCodec).await {
        Ok(r) => r.into_inner(),
        Err(s) => return s.code(),
    };
    // A valid watch stays open: read what comes for a moment, then hang up.
    let read = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Code::Ok,
                Err(s) => return s.code(),
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(150), read).await.unwrap_or(Code::Ok)
}

async fn fuzz_every_rpc(cases_per_rpc: usize) {
    let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("fuzz seed {seed} (set FUZZ_SEED to replay)");
    let (rpcs, messages) = api();
    assert!(rpcs.len() >= 20, "found only {} RPCs in the descriptor set", rpcs.len());

    let env = TestEnv::new(Backend::Sqlite).await;
    let mut child = Binary::serve(env.data_dir()).env("RUST_BACKTRACE", "1").start().await;
    let root = child.root_token().await;
    let bearer = Bearer::new(&root);
    let channel = child.channel().await;
    let mut client = client_over(channel.clone(), &root);
    put(&mut client, "fuzz-canary/ok", b"still here", None).await.expect("canary put");

    // Each RPC gets its own task and random stream; they run side by side.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, rpc) in rpcs.iter().cloned().enumerate() {
        let (channel, bearer, messages) = (channel.clone(), bearer.clone(), messages.clone());
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
            let mut codes: BTreeMap<String, usize> = BTreeMap::new();
            for case in 0..cases_per_rpc {
                let well_formed = case % 2 == 1;
                let body = if well_formed {
                    random_message(&mut rng, &messages, &rpc.input, 0)
                } else {
                    hostile_bytes(&mut rng)
                };
                // Mostly with the root token, so bodies reach the handlers.
                let auth = (!rng.random_bool(0.1)).then_some(&bearer);
                let code = send(channel.clone(), auth, &rpc, body.clone()).await;
                assert_ne!(code, Code::Unknown, "{} answered UNKNOWN to {:02x?} (seed {seed})", rpc.path, body);
                // Undecodable bytes are tonic's INTERNAL; a message that decodes must get a
                // status that says what is wrong with it.
                assert!(
                    !(well_formed && code == Code::Internal),
                    "{} answered INTERNAL to a well-formed message {:02x?} (seed {seed})",
                    rpc.path,
                    body
                );
                let kind = if well_formed { "message" } else { "bytes" };
                *codes.entry(format!("{kind}:{code:?}")).or_default() += 1;
            }
            (rpc.path, codes)
        });
    }
    let mut summary = Vec::new();
    while let Some(done) = tasks.join_next().await {
        summary.push(done.expect("fuzz task"));
    }
    summary.sort();
    for (path, codes) in &summary {
        eprintln!("{path}: {codes:?}");
    }

    // Still serving, with the canary intact.
    assert!(child.try_wait().is_none(), "the daemon exited during the fuzz run");
    assert_eq!(get(&mut client, "fuzz-canary/ok", None).await.expect("good read"), (1, b"still here".to_vec()));
    child.kill().await;
    let logs = child.log().await;
    assert!(!logs.contains("panicked"), "the daemon panicked:\n{logs}");
    assert!(logs.contains("serving gRPC"), "log not captured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_every_rpc_briefly() {
    fuzz_every_rpc(24).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: thousands of cases per RPC"]
async fn fuzz_every_rpc_long() {
    fuzz_every_rpc(2000).await;
}
