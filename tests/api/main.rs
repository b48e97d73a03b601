//! The API of a single node, one test binary: the embedded API (`embedded`), the cluster map of
//! an embedded node and the format-2 upgrade (`membership`), and bad input at the wire
//! (`wire`).

mod embedded;
mod membership;
mod wire;
