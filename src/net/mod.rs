//! The network side of the worker: a tokio runtime on its own threads that
//! performs deliveries and reports outcomes. Nothing here calls Postgres:
//! jobs come in over a channel, outcomes go out over another, and a waker
//! supplied by the Postgres side tells the main thread to look.

mod envelope;
mod failure;
mod http;
mod http1;
mod kafka;
mod kafka_rest;
mod resolve;
mod signature;
mod target;
mod webhook;

use crate::config::Kind;
use crate::event::{Event, Position};
use crate::schedule::LaneId;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc as tokio_mpsc;

pub use failure::{Failure, Verdict};
pub use target::{Target, Transport};

/// One request to one endpoint: a single event, or a batch (Kafka
/// records, CloudEvents batch); several events of one lane are in order.
pub struct Job {
    pub endpoint_id: i32,
    /// Which incarnation of the endpoint's state sent this job; outcomes of
    /// an older incarnation are ignored.
    pub incarnation: u64,
    pub target: Arc<Target>,
    pub events: Vec<(LaneId, Arc<Event>)>,
    /// The worker waits for this outcome (a later event of a lane,
    /// requests that a free slot lets go, or a backlog that room in the
    /// window lets in): it is woken as soon as the outcome is queued.
    /// Other outcomes wake it OUTCOME_DELAY later, together with whatever
    /// else came back by then (failures always at once).
    pub eager: bool,
    /// A chain: later events of the same lane, each sent as a request of
    /// its own once the one before succeeded, while `gate` is open. In an
    /// HTTP drain (one event per request) every outcome woke the main
    /// thread to hand out the lane's next event: two thread hand-offs per
    /// event, and the network side ran dry while the main thread read. A
    /// chain stops at its first failure: what it did not send stays in the
    /// lane.
    pub chain: Vec<(LaneId, Arc<Event>)>,
    pub gate: Gate,
}

/// Whether a job's requests may still go out: a chain looks before each
/// next request, and every request once it is built (`build_request`: it
/// comes back unsent if closed). The network side closes it
/// when a request of the endpoint fails in a way that may hold the whole
/// endpoint (a 429, a 410, no answer: Failure::may_hold_the_endpoint),
/// before the main thread has seen the failure (a 500 for one key stops
/// only its own chain); the main thread when the endpoint's state changes
/// (see EndpointState::stop_chains). And it is closed as soon as any endpoint's
/// configuration changes in the database (`config` moved from the version
/// the job was handed out under): a paused, altered or dropped endpoint
/// gets nothing the worker has not handed out after reloading it.
#[derive(Clone)]
pub struct Gate {
    pub open: Arc<AtomicBool>,
    /// The worker's configuration counter (shared memory) and its value
    /// when the job was handed out.
    pub config: Option<(&'static AtomicU64, u64)>,
}

impl Gate {
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
            && self.config.is_none_or(|(counter, seen)| counter.load(Ordering::Acquire) == seen)
    }
}

/// What the endpoint did with a request, event by event.
pub struct Outcome {
    pub endpoint_id: i32,
    pub incarnation: u64,
    pub results: Vec<(LaneId, Position, Result<(), Failure>)>,
    /// The job's chain goes on after this request: its lane stays in
    /// flight, and no request slot is free yet.
    pub chained: bool,
    /// When the endpoint's answer came (or the request failed): the
    /// worker may take the outcome in up to OUTCOME_DELAY later.
    pub answered: SystemTime,
}

/// How long an outcome the worker does not wait for may wait before it is
/// woken for it. At 8,000 events/s on two cores the main thread was woken
/// some 5,000 times a second, nearly once per event, mostly for outcomes
/// that only moved the cursor; its wake-ups, and the steps they ran, were
/// a tenth of the worker's CPU per event.
const OUTCOME_DELAY: Duration = Duration::from_millis(2);

/// Errors starting the network side.
#[derive(Debug)]
pub struct NetError(pub String);

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Waking the worker's main thread for outcomes: at most once per batch
/// of outcomes it has not taken yet (`pending`, cleared when it takes
/// them), and for outcomes it does not wait for, once OUTCOME_DELAY after
/// the first of them (`delayed`: a timer is set).
#[derive(Clone)]
struct Wakes {
    wake: Waker,
    pending: Arc<AtomicBool>,
    delayed: Arc<AtomicBool>,
}

impl Wakes {
    fn now(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            (self.wake)();
        }
    }

    /// Runs on the runtime (it sets a timer).
    fn soon(&self) {
        if self.pending.load(Ordering::Acquire) || self.delayed.swap(true, Ordering::AcqRel) {
            return; // woken already, or a timer is set
        }
        let wakes = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(OUTCOME_DELAY).await;
            // Cleared first: an outcome queued from now on sets a timer of
            // its own, or is taken with those this wake-up is for.
            wakes.delayed.store(false, Ordering::Release);
            wakes.now();
        });
    }
}

/// Handle to the running network side.
pub struct Network {
    runtime: Option<tokio::runtime::Runtime>,
    jobs: tokio_mpsc::UnboundedSender<Vec<Job>>,
    outcomes: mpsc::Receiver<Outcome>,
    /// Set when outcomes wait and the main thread was woken for them: one
    /// wake-up (a signal to the process) per batch of outcomes, not one
    /// per outcome.
    wake_pending: Arc<AtomicBool>,
}

impl Network {
    /// Start the runtime. `wake` is called after every outcome is queued.
    pub fn start(threads: usize, wake: Waker) -> Result<Network, NetError> {
        let runtime = with_signals_blocked(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .thread_name("outbox-net")
                .on_thread_start(block_all_signals)
                .enable_all()
                .build()
        })
        .map_err(|e| NetError(format!("starting the network runtime: {e}")))?;

        let (jobs, mut job_rx) = tokio_mpsc::unbounded_channel::<Vec<Job>>();
        let (outcome_tx, outcomes) = mpsc::channel();
        let wake_pending = Arc::new(AtomicBool::new(false));
        let wakes = Wakes { wake, pending: wake_pending.clone(), delayed: Arc::new(AtomicBool::new(false)) };
        runtime.spawn(async move {
            while let Some(step) = job_rx.recv().await {
                for job in step {
                    tokio::spawn(run_job(job, outcome_tx.clone(), wakes.clone()));
                }
            }
        });
        Ok(Network { runtime: Some(runtime), jobs, outcomes, wake_pending })
    }

    /// Hand a step's jobs over: one message, so one wake-up of the
    /// runtime however many requests the step starts.
    pub fn submit(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        // Fails only after shutdown, when nobody waits for outcomes anymore.
        let _ = self.jobs.send(jobs);
    }

    /// Outcomes that arrived since the last call.
    pub fn outcomes(&self) -> impl Iterator<Item = Outcome> + '_ {
        // Cleared before draining: an outcome queued from now on wakes us
        // again, one queued before is drained here.
        self.wake_pending.store(false, Ordering::Release);
        self.outcomes.try_iter()
    }

    /// Stop, giving requests in flight at most `grace` to finish.
    pub fn shutdown(mut self, grace: Duration) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(grace);
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The longest one request to `endpoint` may take once it has gone out
/// (`build_request`): every redirect hop has the whole timeout (connecting
/// is inside it); the connect timeout on top is slack. A Kafka producer's
/// call keeps within the timeout, its wait to compress included.
pub fn request_bound(endpoint: &crate::config::Endpoint) -> Duration {
    let options = &endpoint.options;
    options.timeout * (options.max_redirects as u32 + 1) + options.connect_timeout
}

/// Send a job's requests, its first and then its chain's, and report each
/// one's outcome as it comes.
async fn run_job(job: Job, outcome_tx: mpsc::Sender<Outcome>, wakes: Wakes) {
    let Job { endpoint_id, incarnation, target, events, eager, chain, gate } = job;
    let mut requests = std::iter::once(events).chain(chain.into_iter().map(|e| vec![e])).peekable();
    while let Some(request) = requests.next() {
        let events: Vec<Arc<Event>> = request.iter().map(|(_, e)| e.clone()).collect();
        // A panic in a delivery must still produce an outcome, or its
        // lanes would wait forever.
        let results = match CatchUnwind(Box::pin(deliver(&target, &gate, &events))).await {
            Ok(r) => r,
            Err(message) => {
                vec![Err(Failure::retry(format!("internal error in delivery: {message}"))); request.len()]
            }
        };
        let failed = results.iter().any(Result::is_err);
        if results.iter().any(|r| r.as_ref().is_err_and(Failure::may_hold_the_endpoint)) {
            gate.close();
        }
        let chained = !failed && requests.peek().is_some() && gate.is_open();
        let outcome = Outcome {
            endpoint_id,
            incarnation,
            results: request
                .into_iter()
                .zip(results)
                .map(|((lane, event), result)| (lane, event.position, result))
                .collect(),
            chained,
            answered: SystemTime::now(),
        };
        if outcome_tx.send(outcome).is_err() {
            return; // shut down: nobody takes outcomes anymore
        }
        if failed || (eager && !chained) {
            wakes.now();
        } else {
            wakes.soon();
        }
        if !chained {
            return;
        }
    }
}

/// Events larger than this in all make building their request (serialising,
/// checking and signing bodies) heavy enough to leave the runtime's thread.
const HEAVY_BYTES: usize = 256 * 1024;

/// Build the request for `events` with `build`, if it may still go out.
/// When they are large, the building runs off the runtime's thread
/// (outbox_kafka::cpu_bound): the runtime hands its other tasks (every
/// endpoint's requests, their timeouts) to another thread meanwhile, so one
/// endpoint's 60 MB batch does not hold up the rest. At most two such
/// builds run at once in the process, so a request may wait its turn
/// before any of its timeouts start.
///
/// Once built, a request whose gate has closed meanwhile (its endpoint's
/// state changed or was dropped, a request of the endpoint failed in a way
/// that may hold it, or the configuration moved on) is not sent: `Unsent`,
/// and the worker hands the event out again under what holds now. So a
/// request goes out only while its state stands, and its outcome comes
/// within `request_bound` of that: what a rebuilt state waits for
/// (worker/retired.rs), however long the wait to be built was.
pub(crate) async fn build_request<R>(
    gate: &Gate,
    events: &[Arc<Event>],
    build: impl FnOnce() -> R,
) -> Result<R, Failure> {
    let heavy = events.iter().map(|e| e.size()).sum::<usize>() > HEAVY_BYTES;
    let request = outbox_kafka::cpu_bound(heavy, build).await;
    if gate.is_open() {
        Ok(request)
    } else {
        Err(Failure::unsent("not sent: the endpoint changed before the request went out"))
    }
}

/// Send `events` (one request) by the endpoint's protocol; the outcome of
/// each event, in order.
async fn deliver(target: &Target, gate: &Gate, events: &[Arc<Event>]) -> Vec<Result<(), Failure>> {
    match &target.transport {
        Transport::Kafka(producer) => kafka::deliver(producer, target, gate, events).await,
        Transport::Http(http) if target.endpoint.kind == Kind::Webhook => {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
            webhook::deliver(http, target, gate, events, now).await
        }
        Transport::Http(http) => kafka_rest::deliver(http, target, gate, events).await,
    }
}

/// Turns a panic while polling the inner future into an error.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                std::task::Poll::Ready(Err(message))
            }
        }
    }
}

/// Postgres installs signal handlers that call into Postgres; they must only
/// ever run on the worker's main thread. Threads inherit the signal mask of
/// their creator, so block everything while spawning, then restore.
fn with_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: plain libc calls on stack-allocated sigsets.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

fn block_all_signals() {
    // SAFETY: as above; runs at the start of every runtime thread.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::event::Position;
    use crate::net::envelope::tests::sample;
    use serde_json::json;
    use std::time::Instant;

    /// Open, and closed only by `close`.
    fn open_gate() -> Gate {
        Gate { open: Arc::new(AtomicBool::new(true)), config: None }
    }

    fn job(id: i32, options: serde_json::Value, events: Vec<Event>) -> Job {
        let ep = config::Endpoint::parse("t", "http://127.0.0.1:1/", "webhook", &["*".into()], &options).unwrap();
        let target = Arc::new(Target::new(ep, "/outbox/db", Arc::default()).unwrap());
        let events = events.into_iter().map(|e| (LaneId::Solo(e.position), Arc::new(e))).collect();
        Job { endpoint_id: id, incarnation: 1, target, events, eager: true, chain: Vec::new(), gate: open_gate() }
    }

    /// Building one endpoint's large request (a signed CloudEvents batch of
    /// 60 events of 1 MB) must not hold up another endpoint's requests on
    /// the network side's one thread. Neither can reach its receiver
    /// (nothing is allowed): the outcome comes right after the request is
    /// built.
    #[test]
    fn a_heavy_request_does_not_hold_up_a_light_one() {
        let network = Network::start(1, Arc::new(|| {})).unwrap();
        let payload = json!({ "d": "x".repeat(1 << 20) }).to_string();
        let big: Vec<Event> = (0..60)
            .map(|n| Event {
                position: Position { batch: 1, rank: 1, txid: 1, n },
                payload: payload.clone(),
                ..sample()
            })
            .collect();
        let options = json!({"cloudevents": "structured", "batch_size": 100,
                             "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"});
        let started = Instant::now();
        network.submit(vec![job(1, options, big)]);
        std::thread::sleep(Duration::from_millis(50));
        let light_sent = Instant::now();
        network.submit(vec![job(2, json!({}), vec![sample()])]);
        let (mut light, mut heavy) = (None, None);
        while (light.is_none() || heavy.is_none()) && started.elapsed() < Duration::from_secs(60) {
            for outcome in network.outcomes() {
                let at = Some(Instant::now());
                if outcome.endpoint_id == 1 {
                    heavy = at
                } else {
                    light = at
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (light, heavy) = (light.expect("the light outcome"), heavy.expect("the heavy outcome"));
        let heavy_took = heavy - started;
        assert!(
            heavy_took > Duration::from_millis(300),
            "the heavy request must take a while to build: {heavy_took:?}"
        );
        assert!(
            light - light_sent < Duration::from_millis(150) && light < heavy,
            "the light request waited {:?} (the heavy one took {heavy_took:?})",
            light - light_sent
        );
        network.shutdown(Duration::from_millis(100));
    }

    /// A request that waits to be built while its endpoint's state is
    /// dropped (the state's gate closes) is not sent once built: it comes
    /// back unsent. So whatever a rebuilt state waits for
    /// (worker/retired.rs), a request of the old one cannot go out after
    /// it. Here the wait is for a build permit: both are taken until the
    /// test lets them go.
    #[test]
    fn a_request_whose_gate_closed_while_it_waited_to_be_built_is_not_sent() {
        let receiver = tokio::runtime::Runtime::new().unwrap();
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (url, connections) = receiver.block_on(http1::tests::server(vec![(ok, false)]));
        let network = Network::start(1, Arc::new(|| {})).unwrap();
        let (held, release) = (Arc::new(std::sync::Barrier::new(3)), Arc::new(std::sync::Barrier::new(3)));
        for _ in 0..2 {
            let (held, release) = (held.clone(), release.clone());
            network.runtime.as_ref().unwrap().spawn(outbox_kafka::cpu_bound(true, move || {
                held.wait();
                release.wait();
            }));
        }
        held.wait(); // both permits taken
        let mut job = job_to(url.as_str(), true);
        job.events[0].1 = Arc::new(Event { payload: json!({ "d": "x".repeat(300_000) }).to_string(), ..sample() });
        let gate = job.gate.clone();
        network.submit(vec![job]);
        std::thread::sleep(Duration::from_millis(200));
        gate.close(); // the state is dropped while the request waits
        release.wait();
        let outcome = until_the_job_ends(&network).pop().expect("an outcome");
        let failure = outcome.results[0].2.as_ref().expect_err("not sent");
        assert_eq!(failure.verdict, Verdict::Unsent, "{}", failure.message);
        assert!(!failure.endpoint_unavailable() && !failure.may_hold_the_endpoint());
        assert_eq!(connections.load(Ordering::SeqCst), 0, "nothing reached the receiver");
        network.shutdown(Duration::from_millis(100));
    }

    /// The network side with a waker that notes when it was called.
    fn noted_network() -> (Network, Arc<std::sync::Mutex<Vec<SystemTime>>>) {
        let wakes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let noted = wakes.clone();
        let network = Network::start(1, Arc::new(move || noted.lock().unwrap().push(SystemTime::now()))).unwrap();
        (network, wakes)
    }

    fn job_to(url: &str, eager: bool) -> Job {
        let egress =
            crate::egress::Egress { allowed: crate::egress::AllowList::parse("127.0.0.1").unwrap(), proxy: None };
        let ep = config::Endpoint::parse("t", url, "webhook", &["*".into()], &json!({})).unwrap();
        let target = Arc::new(Target::new(ep, "/outbox/db", Arc::new(egress)).unwrap());
        let e = sample();
        Job {
            endpoint_id: 1,
            incarnation: 1,
            target,
            events: vec![(LaneId::Solo(e.position), Arc::new(e))],
            eager,
            chain: Vec::new(),
            gate: open_gate(),
        }
    }

    /// A job to `url` for events 1..=n of lane "k": the first as its
    /// request, the others chained.
    fn chain_to(url: &str, n: i32, gate: &Gate) -> Job {
        let mut job = job_to(url, true);
        let lane = LaneId::Key("k".into());
        let event = |n| Arc::new(Event { position: Position { batch: 1, rank: 1, txid: 1, n }, ..sample() });
        job.events = vec![(lane.clone(), event(1))];
        job.chain = (2..=n).map(|n| (lane.clone(), event(n))).collect();
        job.gate = gate.clone();
        job
    }

    /// The outcomes of one job, up to its last (at most 10 s).
    fn until_the_job_ends(network: &Network) -> Vec<Outcome> {
        let (deadline, mut outcomes) = (Instant::now() + Duration::from_secs(10), Vec::new());
        while outcomes.last().is_none_or(|o: &Outcome| o.chained) && Instant::now() < deadline {
            outcomes.extend(network.outcomes());
            std::thread::sleep(Duration::from_millis(1));
        }
        outcomes
    }

    /// (n, ok, chained) of each outcome.
    fn summary(outcomes: &[Outcome]) -> Vec<(i32, bool, bool)> {
        outcomes.iter().flat_map(|o| o.results.iter().map(|(_, p, r)| (p.n, r.is_ok(), o.chained))).collect()
    }

    /// A chain sends its events one request after another, each outcome
    /// as it comes (the lane stays in flight until the last), and stops
    /// at its first failure: what follows is not sent. A failure that may
    /// hold the endpoint (a 503) closes its gate for the endpoint's other
    /// chains; one of its own event (a 500) does not. A chain whose gate
    /// was closed, or whose worker's configuration moved on, stops after
    /// the request it is on.
    #[test]
    fn a_chain_goes_on_until_a_request_fails_or_its_gate_closes() {
        static CONFIG: AtomicU64 = AtomicU64::new(7);
        let receiver = tokio::runtime::Runtime::new().unwrap();
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let unavailable: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        let failed: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n";
        // Answers in the order requests come, whatever the connection;
        // none left closes it (and a request then fails).
        let answers = [ok, ok, unavailable, ok, ok, ok, failed].map(|a| (a, false)).to_vec();
        let (url, _) = receiver.block_on(http1::tests::server(answers));
        let url = url.to_string();
        let network = Network::start(1, Arc::new(|| {})).unwrap();

        let gate = Gate { config: Some((&CONFIG, 7)), ..open_gate() };
        network.submit(vec![chain_to(&url, 5, &gate)]);
        assert_eq!(summary(&until_the_job_ends(&network)), [(1, true, true), (2, true, true), (3, false, false)]);
        assert!(!gate.is_open(), "a 503 closes the endpoint's chains");

        // A job whose gate closed before it started sends nothing: its
        // first request comes back unsent, not failed.
        let unsent = |outcomes: &[Outcome]| {
            outcomes.len() == 1
                && outcomes[0].results.iter().all(|(_, _, r)| r.as_ref().is_err_and(|f| f.verdict == Verdict::Unsent))
        };
        network.submit(vec![chain_to(&url, 3, &gate)]);
        assert!(unsent(&until_the_job_ends(&network)), "closed: nothing sent");

        let gate = Gate { config: Some((&CONFIG, 7)), ..open_gate() };
        CONFIG.fetch_add(1, Ordering::AcqRel);
        network.submit(vec![chain_to(&url, 3, &gate)]);
        assert!(unsent(&until_the_job_ends(&network)), "configuration changed: nothing sent");

        network.submit(vec![chain_to(&url, 2, &open_gate())]);
        assert_eq!(summary(&until_the_job_ends(&network)), [(1, true, true), (2, true, false)]);

        // The last two answers: event 3 of this chain is not sent.
        let gate = open_gate();
        network.submit(vec![chain_to(&url, 3, &gate)]);
        assert_eq!(summary(&until_the_job_ends(&network)), [(1, true, true), (2, false, false)]);
        assert!(gate.is_open(), "a 500 for one event leaves the other chains going");
        network.shutdown(Duration::from_millis(100));
    }

    /// Wait (at most 10 s) for `n` wake-ups, then OUTCOME_DELAY five times
    /// over for any that should not come; the outcomes and the wake-ups.
    fn settle(
        network: &Network,
        wakes: &std::sync::Mutex<Vec<SystemTime>>,
        n: usize,
    ) -> (Vec<Outcome>, Vec<SystemTime>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while wakes.lock().unwrap().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(OUTCOME_DELAY * 5);
        (network.outcomes().collect(), std::mem::take(&mut *wakes.lock().unwrap()))
    }

    /// An outcome the worker waits for wakes it once, at once; one it
    /// does not wait for wakes it once too, OUTCOME_DELAY after the
    /// answer came (the timer cannot fire early); a failure wakes it at
    /// once whatever the job said.
    #[test]
    fn outcomes_wake_the_worker_at_once_or_a_little_later() {
        // The receiver of the two requests that succeed (http1.rs's test
        // server, on a runtime of its own).
        let receiver = tokio::runtime::Runtime::new().unwrap();
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (url, _) = receiver.block_on(http1::tests::server(vec![(ok, false), (ok, false)]));
        let url = url.to_string();
        let (network, wakes) = noted_network();

        network.submit(vec![job_to(&url, false)]);
        let (outcomes, woken) = settle(&network, &wakes, 1);
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].results[0].2.is_ok(), "delivered");
        assert_eq!(woken.len(), 1, "one wake-up for an outcome nobody waits for");
        let after = woken[0].duration_since(outcomes[0].answered).expect("woken after the answer");
        assert!(after >= OUTCOME_DELAY, "woken {after:?} after the answer");

        network.submit(vec![job_to(&url, true)]);
        let (outcomes, woken) = settle(&network, &wakes, 1);
        assert_eq!((outcomes.len(), woken.len()), (1, 1), "one outcome, one wake-up, no timer");

        // Nothing listens there: the request fails, and that wakes at once.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        network.submit(vec![job_to(&format!("http://{closed}/"), false)]);
        let (outcomes, woken) = settle(&network, &wakes, 1);
        assert!(outcomes[0].results[0].2.is_err());
        assert_eq!(woken.len(), 1, "a failure wakes the worker once, with no timer");
        network.shutdown(Duration::from_millis(100));
    }
}
