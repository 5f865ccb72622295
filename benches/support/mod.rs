//! What the harness-less benches share. Each bench compiles its own copy and uses part
//! of it.
#![allow(dead_code)]

pub mod db;
