//! What Spiderpool decides, over any [`spiderpool_store::Store`]: the rules and writes that
//! `spiderpoolctl`, the agent and the controller share, so every entry point guards the
//! datastore the same way in every mode.
//!
//! - [`admission`]: upstream's webhook rules and mutations;
//! - [`apply`]: apply and delete with those rules, StatefulSet membership, repairs;
//! - [`status`]: the status the system reports for pools and subnets;
//! - [`audit`]: inconsistencies between pools, endpoints and pods, and their repair;
//! - [`reclaim`]: the addresses of dead pods;
//! - [`autopool`]: SpiderSubnet auto-created pools;
//! - [`multus`]: the NetworkAttachmentDefinitions of SpiderMultusConfigs outside a cluster.
//!
//! This crate imports the Store contract, the API types and the core rules, never a backend
//! (`kube`, `etcd_client`, `rusqlite`): its tests run on the memory store.

pub mod admission;
pub mod apply;
pub mod audit;
pub mod autopool;
pub mod multus;
pub mod reclaim;
pub mod status;
