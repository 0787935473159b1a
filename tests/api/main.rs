//! Black-box tests of the `proxmoxer` daemon: one test binary, many modules.

mod api_auth;
mod bench;
mod connections;
mod day2;
mod fake_pve;
mod fake_pve_selftest;
mod helpers;
mod members;
mod monitoring;
mod operations;
mod persistence;
mod reads;
mod registration;
mod schemathesis;
mod status_page;
mod terminal;
mod tls;
mod tokens;
mod writes;
