//! Black-box tests of the `proxmoxer` daemon: one test binary, many modules.

mod api_auth;
mod bench;
mod connections;
mod day2;
#[cfg(feature = "etcd")]
mod etcd_server;
mod fake_pve;
mod fake_pve_selftest;
#[cfg(feature = "etcd")]
mod ha;
#[cfg(feature = "etcd")]
mod ha_bench;
mod helpers;
mod members;
mod monitoring;
mod operations;
mod persistence;
mod reads;
mod registration;
mod schemathesis;
mod status_page;
mod storage_backend;
mod terminal;
mod tls;
mod tokens;
mod writes;
