//! The same configurations as `overhead`, under contention: a multi-threaded runtime with
//! two worker threads, 256 tasks, and the service cloned for every call as hyper-util users
//! do. Reported as calls per second; what it shows is the cost of shared writes (reference
//! counts, locks) when two cores hammer the same state.
#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, measurement::WallTime, BenchmarkGroup, Criterion, Throughput,
};
use http::{Request, Response};
use support::{request, Body, Contenders};
use tower::{Service, ServiceExt};

const TASKS: u64 = 256;

/// Benches each contender in one group, on one runtime.
struct Contention<'a, 'c> {
    group: &'a mut BenchmarkGroup<'c, WallTime>,
    runtime: &'a tokio::runtime::Runtime,
}

impl Contenders for Contention<'_, '_> {
    fn contender<S, B>(&mut self, name: &str, service: S)
    where
        S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: std::fmt::Debug,
        B: Send + 'static,
    {
        let runtime = self.runtime;
        self.group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let per_task = iterations.div_ceil(TASKS);
                runtime.block_on(async {
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|_| {
                            let service = service.clone();
                            tokio::spawn(async move {
                                for _ in 0..per_task {
                                    service.clone().oneshot(request()).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                    // Scaled to the iterations asked for, since the last task may do a few more.
                    started
                        .elapsed()
                        .mul_f64(iterations as f64 / (per_task * TASKS) as f64)
                })
            })
        });
    }
}

fn contention(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let layer = runtime.block_on(support::refresh_layer());

    let mut group = c.benchmark_group("contention");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));
    support::each_contender(
        &layer,
        &mut Contention {
            group: &mut group,
            runtime: &runtime,
        },
    );
    group.finish();
}

criterion_group!(benches, contention);
criterion_main!(benches);
