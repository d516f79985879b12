//! Spoke carries Kubernetes control-plane → node traffic over connections the nodes dial out.
//!
//! `spoke-server` takes kube-apiserver's HTTP CONNECT requests and routes each to the agent of the node
//! that serves the destination; `spoke-agent` keeps a control channel and a pool of data connections
//! to the server, dials the targets its policy allows, and relays each stream on its own connection.
//!
//! Layers, each importing only the ones below it: the binaries → [`server`] (with [`apiserver`]),
//! [`agent`] (with [`admin`] and [`metrics`]) → [`datapath`], [`transport`], [`codec`], [`frontend`] →
//! [`protocol`]. Leaves any
//! layer may use: [`config`] (flag parsers), [`budget`] (memory limits), [`telemetry`], [`shutdown`], [`process`]. [`devcerts`]
//! (development certificates) serves the binaries and tests.
#![deny(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod apiserver;
pub mod budget;
pub mod codec;
pub mod config;
pub mod datapath;
pub mod devcerts;
pub mod frontend;
pub mod metrics;
pub mod process;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod transport;

pub use agent::run_agent;
pub use server::run_server;

/// Exit status for an unusable configuration (`EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status for a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
