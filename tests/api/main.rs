//! The API of a single node, one test binary: the embedded API (`embedded`) and bad input at
//! the wire (`wire`).

mod embedded;
mod wire;
