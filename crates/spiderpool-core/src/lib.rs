//! Pure domain of the Spiderpool IPAM: IP sets, label selectors, validated pools, candidate
//! selection and the lowest-free pick. No I/O: the agent feeds facts in and commits what
//! comes out through a store.

pub mod candidate;
pub mod ippool;
pub mod ipset;
pub mod pick;
pub mod selector;

pub use candidate::{AllocError, Plan, PoolNames, Rejected, Rejection, Request, Source};
pub use ippool::{Pool, PoolError, PoolRule, Route, COUNT_MAX};
pub use ipset::{IpFamily, IpRange, IpRangeError, IpSet};
pub use selector::{LabelSelector, Labels, Requirement, SelectorError};
