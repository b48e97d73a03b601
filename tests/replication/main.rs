//! Replication over real sockets with in-process nodes, one test binary: the peer transport
//! (`transport`), forwarding (`forwarding`), and the read levels under partitions and held
//! applies (`consistency`).

mod consistency;
mod forwarding;
mod transport;
