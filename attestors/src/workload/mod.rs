//! Workload attestors: selectors for the process at the other end of a
//! Workload API connection.

pub mod unix;
