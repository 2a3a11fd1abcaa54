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
//! the calls (runtime, layer setup, the first token) cancels out. The contenders are the
//! benchmark's, by the same names: see `each_contender` in `benches/support`.
#![allow(missing_docs)]

#[path = "../benches/support/mod.rs"]
mod support;

use std::hint::black_box;

use http::{Request, Response};
use support::{drive, request, Body, Contenders};
use tower::Service;

/// Drives the contender named `wanted`, `count` times.
struct Run {
    wanted: String,
    count: u64,
    found: bool,
}

impl Contenders for Run {
    fn contender<S, B>(&mut self, name: &str, service: S)
    where
        S: Service<Request<Body>, Response = Response<B>>,
        S::Error: std::fmt::Debug,
    {
        if name == self.wanted {
            self.found = true;
            run(service, self.count);
        }
    }
}

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
    let wanted = args.next().unwrap_or_else(|| "refresh_layer".to_owned());
    let count: u64 = args
        .next()
        .map_or(10_000, |count| count.parse().expect("count is a number"));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let layer = runtime.block_on(support::refresh_layer());

    let mut run = Run {
        wanted,
        count,
        found: false,
    };
    support::each_contender(&layer, &mut run);
    assert!(run.found, "unknown contender {}", run.wanted);
}
