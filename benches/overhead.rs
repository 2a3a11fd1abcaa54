//! The cost the layer adds to one request on the fresh-token path, next to the bare inner
//! service and the alternatives a user would write instead, measured in the same run.
//!
//! Each iteration drives one request through `poll_ready`, `call` and the response future, with
//! a no-op waker, on one thread: the inner service answers at once, so what remains is the
//! work of the middleware itself. Building the request is left out of the measurement.
#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use criterion::{
    criterion_group, criterion_main, measurement::WallTime, BatchSize, BenchmarkGroup, Criterion,
};
use http::{Request, Response};
use support::{drive, request, Body, Contenders};
use tower::Service;

/// Benches each contender in one group.
struct Overhead<'a, 'c>(&'a mut BenchmarkGroup<'c, WallTime>);

impl Contenders for Overhead<'_, '_> {
    fn contender<S, B>(&mut self, name: &str, mut service: S)
    where
        S: Service<Request<Body>, Response = Response<B>>,
        S::Error: std::fmt::Debug,
    {
        self.0.bench_function(name, |b| {
            b.iter_batched(request, |r| drive(&mut service, r), BatchSize::SmallInput)
        });
    }
}

fn overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let layer = runtime.block_on(support::refresh_layer());

    let mut group = c.benchmark_group("overhead");
    support::each_contender(&layer, &mut Overhead(&mut group));
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
