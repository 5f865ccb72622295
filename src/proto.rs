//! Generated protobuf and gRPC code for package `credvault.v1`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("credvault.v1");

/// Encoded descriptors of the API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/credvault_descriptor.bin"));
