//! Drives one contender of `benches/overhead.rs` through `count` requests on one thread, for
//! an instruction-count profile of the fresh-token path:
//!
//! ```sh
//! cargo build --release --example profile_hot_path
//! for n in 10000 20000; do
//!     valgrind --tool=callgrind --callgrind-out-file=refresh_layer.$n.out \
//!         target/release/examples/profile_hot_path refresh_layer $n
//! done
//! ```
//!
//! Instructions per call are `(total(20000) - total(10000)) / 10000`: what a run costs besides
//! the calls (runtime, layer setup, the first token) cancels out. Contenders: `bare`,
//! `static_header`, `arc_floor`, `mutex_layer`, `refresh_layer`, `refresh_layer_no_retry`.
#![allow(missing_docs)]

#[path = "../benches/support/mod.rs"]
mod support;

use std::hint::black_box;

use http::{Request, Response};
use support::{drive, ready_service, request, Body};
use tower::{Layer, Service};

#[inline(never)]
fn run<S, B>(mut service: S, count: u64)
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..count {
        black_box(drive(&mut service, request()));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let contender = args.next().unwrap_or_else(|| "refresh_layer".to_owned());
    let count: u64 = args
        .next()
        .map_or(10_000, |count| count.parse().expect("count is a number"));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let layer = runtime.block_on(support::refresh_layer());

    match contender.as_str() {
        "bare" => run(ready_service(), count),
        "static_header" => run(support::static_header(ready_service()), count),
        "arc_floor" => run(support::arc_floor(ready_service()), count),
        "mutex_layer" => run(support::mutex_layer(ready_service()), count),
        "lockfree_floor" => run(support::lockfree_floor(ready_service(), false), count),
        "lockfree_floor_copy" => run(support::lockfree_floor(ready_service(), true), count),
        "refresh_layer" => run(layer.layer(ready_service()), count),
        "refresh_layer_no_retry" => run(layer.retry(false).layer(ready_service()), count),
        other => panic!("unknown contender {other}"),
    }
}
