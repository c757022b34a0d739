//! `calibrate`'s live pass: the real engine loop (the production scheduler over llama.cpp)
//! serves a synthetic workload in this process, and every batch it runs is timed. Steps
//! taken this way have the shapes the scheduler really makes — chunked prefills beside a
//! few decodes, at the contexts a workload reaches — and pay what the live engine pays
//! around the kernels (sampling, bookkeeping), which the grid's isolated batches do not.

use super::Point;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenfab_engine::{
    BatchEntry, Engine, EngineConfig, EngineMetrics, Event, ExecError, Executor, ExecutorCapacity,
    GenerateRequest, Sampled, SamplingParams,
};
use tokenfab_sim::StepShape;
use tokenfab_types::{Band, SeqSlot, TenantId, Tokens};

/// The trace seed: not the fidelity check's default, so the profile is not fitted to the
/// very requests it is then compared on.
const SEED: u64 = 7;

/// An executor that records the shape and time of every batch it runs.
struct Timed<E> {
    inner: E,
    points: Arc<Mutex<Vec<Point>>>,
}

impl<E: Executor> Executor for Timed<E> {
    fn capacity(&self) -> ExecutorCapacity {
        self.inner.capacity()
    }
    fn release(&mut self, slot: SeqSlot) {
        self.inner.release(slot);
    }
    fn begin(&mut self, slot: SeqSlot, params: &SamplingParams) {
        self.inner.begin(slot, params);
    }
    fn copy_prefix(&mut self, from: SeqSlot, to: SeqSlot, tokens: u64) {
        self.inner.copy_prefix(from, to, tokens);
    }
    fn trim(&mut self, slot: SeqSlot, from: u64) {
        self.inner.trim(slot, from);
    }
    fn run(&mut self, batch: &[BatchEntry<'_>]) -> Result<Vec<Sampled>, ExecError> {
        let started = Instant::now();
        let out = self.inner.run(batch)?;
        let secs = started.elapsed().as_secs_f64();
        let shape = StepShape::of_batch(self.inner.capacity().fast_prefill_rows, batch);
        if let Ok(mut p) = self.points.lock() {
            p.push(Point {
                what: "live".into(),
                shape,
                secs,
                spread: Vec::new(),
            });
        }
        Ok(out)
    }
}

/// Serve `spec` (a `sim --synthetic` workload) on the engine `make` builds, with serve's
/// engine settings, at the trace's arrival times; the timed steps.
pub(super) fn measure<E, F>(spec: &str, engine: EngineConfig, make: F) -> anyhow::Result<Vec<Point>>
where
    E: Executor + 'static,
    F: FnOnce() -> Result<E, String> + Send + 'static,
{
    let trace = tokenfab_sim::trace::synthetic(spec, SEED)?;
    let points = Arc::new(Mutex::new(Vec::new()));
    let recorded = points.clone();
    let metrics = EngineMetrics::new(&prometheus::Registry::new(), "calibrate")?;
    let engine = Engine::spawn(engine, metrics, move || {
        make().map(|inner| Timed {
            inner,
            points: recorded,
        })
    })?;
    let last = trace.last().map_or(0.0, |r| r.arrival.as_secs_f64());
    eprintln!(
        "live: {} requests over {last:.0} s ({spec}, seed {SEED})",
        trace.len()
    );
    // Clients are tokio tasks, as under `serve`: their wake-ups per token compete with the
    // kernel threads as a server's do.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_time()
        .build()?;
    let start = Instant::now();
    rt.block_on(async {
        let start = tokio::time::Instant::now();
        let mut clients = Vec::with_capacity(trace.len());
        for (i, r) in trace.into_iter().enumerate() {
            tokio::time::sleep_until(start + Duration::from_nanos(r.arrival.0)).await;
            // Distinct prompts: the prefix cache must not turn a prefill into a copy.
            let prompt = super::filler_tokens(r.input_tokens.max(1), 1000 + i as u64);
            let mut generation = engine.submit(GenerateRequest {
                tenant: TenantId("calibrate".into()),
                band: Band::Standard,
                weight: 1,
                prompt,
                max_new: Tokens(r.output_tokens.max(1)),
                seed: Some(i as u64),
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..SamplingParams::default()
                },
                slo: Default::default(),
                cache_scope: None,
            })?;
            clients.push(tokio::spawn(async move {
                while let Some(ev) = generation.next().await {
                    if let Event::Failed(e) = ev {
                        return Err(e.to_string());
                    }
                }
                Ok(())
            }));
        }
        for c in clients {
            c.await
                .map_err(|_| anyhow::anyhow!("a live request's client panicked"))?
                .map_err(|e| anyhow::anyhow!("a live request failed: {e}"))?;
        }
        anyhow::Ok(())
    })?;
    drop(engine);
    let points = std::mem::take(&mut *points.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    eprintln!(
        "live: {} steps in {:.0} s",
        points.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_pass_times_every_step_the_engine_runs() {
        // A timing model stands in for llama.cpp: 1 ms a step plus 10 µs a token.
        let spec = tokenfab_sim::MockSpec::parse("linear:1:10").expect("spec");
        let capacity = ExecutorCapacity {
            slots: 16,
            kv_tokens: 4096,
            max_seq_tokens: 4096,
            max_batch_tokens: 512,
            stream_per_slot: false,
            fast_prefill_rows: 1,
        };
        let points = measure("poisson:200:6:40:5", EngineConfig::default(), move || {
            Ok(tokenfab_sim::ModelExecutor::new(spec, capacity))
        })
        .expect("measured");
        let trace = tokenfab_sim::trace::synthetic("poisson:200:6:40:5", SEED).expect("trace");
        // Every prompt token and every generated token but each request's last went
        // through a step (the last one is sampled, never fed back).
        let fed: u64 = trace
            .iter()
            .map(|r| r.input_tokens.max(1) + r.output_tokens.max(1) - 1)
            .sum();
        assert_eq!(points.iter().map(|p| p.shape.tokens).sum::<u64>(), fed);
        for p in &points {
            let s = p.shape;
            assert!(
                s.seqs >= 1 && s.tokens >= s.seqs && s.row_kv + s.tiled_kv >= s.tokens,
                "{p:?}"
            );
            assert!(p.secs >= 0.001, "the model's 1 ms a step was timed: {p:?}");
        }
    }
}
