//! Integration tests: the real `gitfleet` binary against real Git repositories.

#[path = "../common/mod.rs"]
mod common;

mod balancer;
mod browser;
mod check;
mod collector;
mod demo;
mod dockerfile;
mod fuzz;
mod import;
mod install;
mod opamp;
mod peers;
mod postgres;
mod proto;
mod reliability;
mod rollout;
mod serve;
mod status;
mod tls;
mod tokens;
