//! The background worker: one per database named in `outbox.databases`,
//! started by the launcher (launcher.rs) as role outbox_worker.
//!
//! Its main thread is the Postgres side: it waits on its latch (set by
//! commits, by the network side and by signals), then runs one short
//! transaction that takes a tick and lets every endpoint persist what it
//! learned and read new events, each endpoint in a subtransaction of its
//! own (one endpoint's failure undoes only its own work), and finally hands
//! ready events to the network side. It never holds a transaction or
//! snapshot while requests are in flight.
//!
//! Modules: `ticks` (snapshots and commit order), `stream` (reading
//! batches), `parked` (lanes in outbox.parked), `store` (endpoints and
//! progress), `endpoint` (one endpoint's state), `retired` (requests of
//! states dropped that are still out), `rotation` (emptying the
//! events tables), `error` (the error type and (sub)transactions),
//! `session` and `launcher` (who runs, as whom).

mod endpoint;
mod error;
pub mod launcher;
mod parked;
mod retired;
mod rotation;
pub(crate) mod rows;
mod session;
mod store;
mod stream;
pub(crate) mod ticks;

use crate::egress::{AllowList, Egress};
use crate::guc;
use crate::net::{self, Network, Outcome};
use crate::shmem;
use endpoint::{EndpointState, Step};
use error::{subtransaction, transaction, Result, WorkerError};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often rotation and tick cleanup run.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);
/// Endpoint rows are re-read at least this often, even unasked.
const RELOAD_EVERY: Duration = Duration::from_secs(10);
/// Take a tick once this many commits were noted since the last one, even
/// when no endpoint has caught up: batches stay small.
const TICK_AFTER_COMMITS: u64 = 1_000;
/// At high commit rates (COMMITS_TO_PACE a second and more) a tick for
/// commits noted since the last one waits until TICK_PACE has passed since
/// that tick, or until TICK_GATHER of them are noted when the worker wakes
/// for something else (commits do not wake it while it waits). Below that
/// rate a commit is ticked as soon as the worker wakes for it; above, a
/// tick per commit or two cost a step's statements (a transaction, the
/// tick, the read) per event or two, and the worker spent more than twice
/// a drain's CPU per event. With 16 commits or 2 ms it still fell behind
/// at 8,400 events/s on 2 cores in most runs (then stayed behind, its
/// threads waiting for CPU), with 32 or 4 ms it kept up in every run
/// (about a millisecond more from commit to receiver when it does).
const COMMITS_TO_PACE: f64 = 2_000.0;
const TICK_GATHER: u64 = 32;
const TICK_PACE: Duration = Duration::from_millis(4);
/// After the worker's own step failed, or an endpoint's, wait this long.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Register the launcher, which starts one worker per configured database
/// (postmaster, at preload).
pub fn register_all() {
    let databases = guc::databases();
    if databases.len() > shmem::MAX_DATABASES {
        pgrx::warning!(
            "outbox.databases lists {} databases; workers start for the first {}",
            databases.len(),
            shmem::MAX_DATABASES
        );
    }
    if !databases.is_empty() {
        launcher::register();
    }
}

// The latch is set from network threads. pgrx's guarded SetLatch refuses to
// run off the main thread; Postgres's own SetLatch is safe to call from any
// thread of the process (it only flips a flag and signals the owner).
unsafe extern "C-unwind" {
    #[link_name = "SetLatch"]
    fn set_latch_from_any_thread(latch: *mut pg_sys::Latch);
}

#[pg_guard]
unsafe extern "C-unwind" fn release_on_exit(_code: i32, arg: pg_sys::Datum) {
    // SAFETY: MyProcPid is set in every process.
    shmem::leave_worker(arg.value(), unsafe { pg_sys::MyProcPid });
}

/// A database worker, started by the launcher (launcher.rs) as role
/// outbox_worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_worker_main(arg: pg_sys::Datum) {
    let index = arg.value();
    let Some((db_oid, role_oid)) = launcher::worker_target_of(BackgroundWorker::get_extra()) else {
        pgrx::warning!("outbox worker: started without a database; exiting");
        return;
    };
    attach_signal_handlers();
    // One worker per database, whoever started it (a launcher that was
    // restarted does not know the workers of its predecessor).
    // SAFETY: MyProcPid is set in every process.
    let pid = unsafe { pg_sys::MyProcPid };
    if !shmem::claim_worker(index, pid) {
        return;
    }
    // SAFETY: registered before anything can fail, so the entry is given
    // back however this process ends.
    unsafe { pg_sys::before_shmem_exit(Some(release_on_exit), pg_sys::Datum::from(index)) };
    session::connect(db_oid, role_oid);
    let db = session::database_name();
    // SAFETY: connected.
    unsafe { shmem::publish_worker(index, pg_sys::MyDatabaseId) };

    // Large buffers (request bodies, payload text) always get memory of
    // their own, returned when freed: with glibc's adaptive threshold they
    // would come from heaps that keep their size, and the worker's memory
    // would creep above its window.
    // Fixing that threshold also fixes the one for giving the heap's
    // free top back to the kernel (128 KB): the main heap then shrank and
    // grew again with every step (some 1,600 brk calls a second, and the
    // page faults behind them, in an HTTP drain). It keeps up to 8 MB of
    // small allocations' free memory instead.
    // SAFETY: malloc settings of this process, set before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 * 1024 * 1024);
    }

    let latch = unsafe { pg_sys::MyLatch } as usize;
    let wake: net::Waker = Arc::new(move || unsafe { set_latch_from_any_thread(latch as *mut pg_sys::Latch) });
    // One network thread. With two, every request cost a futex wake-up
    // between them (one thread parked on the condition variable, the other
    // on epoll) and contended the connection pool's lock; one thread owns
    // the event loop and parks only when it has nothing to do. Measured in
    // HTTP drains (200,000 events, the builds alternating): 25.9-27.6 µs of
    // worker CPU per event against 29.3-31.2 with two threads and the same
    // other changes, 31.5-34.1 before them.
    let network = match Network::start(1, wake) {
        Ok(n) => n,
        Err(e) => {
            pgrx::log!("outbox worker: {e}; restarting");
            unsafe { pg_sys::proc_exit(1) };
        }
    };
    pgrx::log!("outbox worker started in database {db:?}");

    let mut worker = Worker::new(index, &db, network);
    while BackgroundWorker::wait_latch(Some(worker.timeout())) {
        if shmem::releasing(index) {
            pgrx::log!("outbox worker: leaving database {db:?}, which must be free of connections");
            break;
        }
        if worker.superuser {
            pgrx::warning!("outbox worker: role outbox_worker was made a superuser; the worker never runs as one");
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: main thread, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            session::pin_settings();
            worker.settings_reloaded();
        }
        worker.step();
    }
    if !shmem::releasing(index) && !worker.superuser {
        worker.save_all();
    }
    worker.network.shutdown(Duration::from_millis(500));
    pgrx::log!("outbox worker in database {db:?} stopped");
}

/// SIGHUP and SIGTERM set flags and wake the latch; then the configuration
/// file is read once. PostgreSQL ignores SIGHUP in a background worker
/// until its handler is set, so a reload that reached this process while
/// it started (the postmaster forked it just before reloading) would be
/// lost, and the process would keep the settings from before the reload
/// (an `outbox.allowed_hosts` that was narrowed, say) until the next one.
pub(crate) fn attach_signal_handlers() {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: main thread, outside any transaction.
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
}

struct Worker {
    /// The database's index in outbox.databases (and in shared memory).
    index: usize,
    /// CloudEvents source of this database's events.
    source: String,
    /// outbox.allowed_hosts and outbox.http_proxy, re-read on reload.
    egress: Arc<Egress>,
    network: Network,
    endpoints: Vec<EndpointState>,
    ticks: ticks::Ticks,
    latest_tick: i64,
    last_tick: Instant,
    ticker: ticks::Ticker,
    commit_rate: ticks::CommitRate,
    /// The oid of the extension the state below belongs to: a reinstall
    /// (DROP and CREATE EXTENSION) starts over from the new tables.
    extension: Option<u32>,
    config_version: Option<u64>,
    next_incarnation: u64,
    last_reload: Instant,
    last_maintenance: Instant,
    /// After an error of the whole step, wait until then.
    error_pause_until: Option<Instant>,
    /// Endpoints whose step failed: rebuilt from the tables, not before.
    broken: HashMap<i32, Instant>,
    /// Requests of dropped endpoint states still out: their endpoints'
    /// new states wait for them.
    retired: retired::Retired,
    /// Events were read in this step: their commits must be durable
    /// before anything is sent.
    read_events: bool,
    /// Transactions that emitted committed since the last tick was taken
    /// (or looked for): their events are in no tick yet.
    commits_unticked: bool,
    /// Whether commits wake the worker, and when it comes back by itself
    /// for commits left for a paced tick (see ticks::CommitWakes).
    commit_wakes: ticks::CommitWakes,
    /// The worker's role was found to be a superuser: stop.
    superuser: bool,
    /// The version of an installation this library does not run (older,
    /// before ALTER EXTENSION UPDATE), as last logged.
    waiting_for_update: Option<String>,
}

impl Worker {
    fn new(index: usize, database: &str, network: Network) -> Worker {
        Worker {
            index,
            source: format!("/outbox/{database}"),
            egress: Arc::new(read_egress()),
            network,
            endpoints: Vec::new(),
            ticks: ticks::Ticks::default(),
            latest_tick: 0,
            last_tick: Instant::now(),
            ticker: ticks::Ticker::default(),
            commit_rate: ticks::CommitRate::new(Instant::now()),
            extension: None,
            config_version: None,
            next_incarnation: 1,
            last_reload: Instant::now(),
            last_maintenance: Instant::now(),
            error_pause_until: None,
            broken: HashMap::new(),
            retired: retired::Retired::default(),
            read_events: false,
            commits_unticked: true,
            commit_wakes: ticks::CommitWakes::default(),
            superuser: false,
            waiting_for_update: None,
        }
    }

    /// After SIGHUP: targets are rebuilt when the egress settings changed.
    fn settings_reloaded(&mut self) {
        let egress = read_egress();
        if egress != *self.egress {
            // Narrowed, maybe: no chain sends under the old rules while
            // the endpoints wait for the next step to be rebuilt.
            self.stop_all_chains();
            self.egress = Arc::new(egress);
            self.config_version = None; // reload endpoints next step
        }
    }

    /// Every endpoint's chains send nothing after the request they are on.
    fn stop_all_chains(&mut self) {
        for ep in &mut self.endpoints {
            ep.stop_chains();
        }
    }

    /// How long to sleep when nothing wakes the latch: until the poll
    /// interval ends, or an endpoint has something to do.
    fn timeout(&self) -> Duration {
        let now = Instant::now();
        let mut until = now + poll_interval();
        for t in self.endpoints.iter().flat_map(|e| [e.next_wake(now), e.save_due()]).flatten() {
            until = until.min(t);
        }
        if self.commits_unticked && self.tick_may_wait(now) {
            until = until.min(self.last_tick + TICK_PACE);
        }
        // Commits do not wake us: come back when their paced tick is due,
        // even if that was during the step.
        if let Some(t) = self.commit_wakes.wake_by() {
            until = until.min(t);
        }
        if let Some(t) = self.retired.next_end().filter(|t| *t > now) {
            until = until.min(t);
        }
        sleep_until(now, until, self.error_pause_until).saturating_duration_since(now).max(Duration::from_millis(1))
    }

    fn step(&mut self) {
        let now = Instant::now();
        if self.error_pause_until.is_some_and(|t| t > now) {
            return;
        }
        if let Some(ring) = shmem::commit_ring(self.index) {
            self.commit_rate.update(ring, now);
        }
        // Before reading anything: a commit from now on wakes us again.
        // Not while commits noted already wait for a paced tick: the
        // latch's timeout brings us back for it (see `timeout`), and at
        // high rates every commit woke the worker for a step that did
        // nothing. Taking the tick asks for commit wake-ups again.
        let paced = self.commits_unticked && self.tick_may_wait(now);
        if self.commit_wakes.step(paced, self.last_tick + TICK_PACE) {
            self.commits_unticked |= shmem::worker_awake(self.index);
        }
        self.error_pause_until = None;
        self.apply_outcomes();

        // Most wake-ups in a drain bring outcomes and nothing else: the
        // window still holds events to send and progress was written a
        // moment ago. Those steps hand out requests without a transaction.
        if self.wants_database(Instant::now()) {
            self.read_events = false;
            if let Err(e) = transaction(|| self.sync()) {
                pgrx::warning!("outbox worker: {e}");
                // Forget what may not have been written; start again from
                // the tables after a pause.
                self.forget_all();
                self.error_pause_until = Some(Instant::now() + ERROR_PAUSE);
                return;
            }
            if self.read_events {
                flush_wal();
            }
        } else if self.commits_unticked && self.tick_may_wait(Instant::now()) {
            // Commits this step noted wait for the pace: back by its end.
            self.commit_wakes.defer(self.last_tick + TICK_PACE);
        }
        self.dispatch(Instant::now());

        if self.extension.is_some() && self.last_maintenance.elapsed() >= MAINTAIN_EVERY {
            self.last_maintenance = Instant::now();
            self.maintain();
        }
    }

    /// Whether this step needs the database: the extension or the
    /// configuration may have changed, a tick is due, or an endpoint has
    /// something to read or write (EndpointState::wants_step).
    fn wants_database(&self, now: Instant) -> bool {
        if self.extension.is_none()
            || self.reload_due(shmem::config_version(self.index), now)
            || self.last_tick.elapsed() >= poll_interval()
        {
            return true;
        }
        let window = window();
        let to_tick = self.commits_unticked && !self.tick_may_wait(now);
        self.endpoints.iter().any(|ep| {
            let unread = to_tick || ep.read_tick() < self.latest_tick;
            ep.wants_step(now, window, unread)
        })
    }

    /// Whether endpoints must be read again: the configuration changed
    /// (`version`), RELOAD_EVERY passed, or a broken endpoint's pause ended.
    fn reload_due(&self, version: u64, now: Instant) -> bool {
        self.config_version != Some(version)
            || self.last_reload.elapsed() >= RELOAD_EVERY
            || self.broken.values().any(|t| *t <= now)
    }

    /// Before the worker exits: outcomes that came back are written, so a
    /// restart does not send their events again.
    fn save_all(&mut self) {
        // Chains stop after the request they are on: what they sent after
        // this would not be written, and would go out again.
        self.stop_all_chains();
        self.apply_outcomes();
        if self.extension.is_none() {
            return;
        }
        let now = Instant::now();
        let saved = transaction(|| {
            if store::pin_extension()?.0 != self.extension {
                return Ok(());
            }
            for ep in &mut self.endpoints {
                if let Err(e) = subtransaction(|| ep.write_back(now, true)) {
                    pgrx::warning!("outbox worker: endpoint {}: {e}", ep.id);
                }
            }
            Ok(())
        });
        if let Err(e) = saved {
            pgrx::warning!("outbox worker: writing progress before exiting: {e}");
        }
    }

    fn forget_all(&mut self) {
        self.commits_unticked = true;
        self.ticker.forget();
        let now = Instant::now();
        for ep in self.endpoints.drain(..) {
            self.retired.note(self.extension, &ep, now);
        }
        self.extension = None;
        self.ticks.clear();
        shmem::want_commits(self.index, false);
    }

    fn apply_outcomes(&mut self) {
        let outcomes: Vec<Outcome> = self.network.outcomes().collect();
        let now = Instant::now();
        for o in outcomes {
            // Outcomes of state rebuilt since are dropped: the event is read
            // again from the tables.
            if let Some(ep) =
                self.endpoints.iter_mut().find(|e| e.id == o.endpoint_id && e.incarnation == o.incarnation)
            {
                ep.on_outcome(o, now);
            } else {
                self.retired.on_outcome(&o);
            }
        }
    }

    /// The database part of a step, in one transaction.
    fn sync(&mut self) -> Result<()> {
        // SAFETY: a catalog-cache lookup of our own role, in a transaction.
        if unsafe { pg_sys::superuser() } {
            self.superuser = true;
            return Ok(());
        }
        let (extension, version) = store::pin_extension()?;
        let other_version = version.filter(|v| extension.is_none() && v != crate::installation::LIBRARY_VERSION);
        if other_version.is_some() && other_version != self.waiting_for_update {
            pgrx::log!(
                "outbox worker: the extension is version {} and this library runs version {}; nothing is delivered \
                 until ALTER EXTENSION outbox UPDATE",
                other_version.as_deref().unwrap_or_default(),
                crate::installation::LIBRARY_VERSION
            );
        }
        self.waiting_for_update = other_version;
        if extension != self.extension {
            // Installed, dropped or installed anew: nothing known so far
            // belongs to the tables now there.
            self.forget_all();
            self.extension = extension;
            self.config_version = None;
            if extension.is_none() {
                return Ok(());
            }
            self.latest_tick = self.ticker.latest()?;
        }
        if extension.is_none() {
            return Ok(());
        }

        let version = shmem::config_version(self.index);
        if self.reload_due(version, Instant::now()) {
            rotation::publish_current(self.index)?;
            self.reload_endpoints()?;
            self.config_version = Some(version);
            self.last_reload = Instant::now();
        }
        self.tick()?;

        let mut step =
            Step { ticks: &mut self.ticks, latest_tick: self.latest_tick, window: window(), now: Instant::now() };
        let mut failed = Vec::new();
        for ep in &mut self.endpoints {
            let before = ep.read_tick();
            match subtransaction(|| ep.sync(&mut step)) {
                Err(e) => failed.push((ep.id, e)),
                Ok(read) => self.read_events |= read > 0 || ep.read_tick() != before,
            }
        }
        for (id, e) in failed {
            self.endpoint_failed(id, e);
        }
        // Keep only the ticks endpoints read between next.
        let needed: std::collections::HashSet<i64> =
            self.endpoints.iter().flat_map(|e| [e.read_tick(), e.read_tick() + 1]).collect();
        self.ticks.retain(|id| needed.contains(&id));
        Ok(())
    }

    /// One endpoint's step failed (in its subtransaction, rolled back): its
    /// state is dropped and rebuilt from the tables after a pause; others
    /// go on. The error goes to the log and to its last_error.
    fn endpoint_failed(&mut self, id: i32, e: WorkerError) {
        pgrx::warning!("outbox worker: endpoint {id}: {e}");
        let message = format!("outbox worker: {e}");
        if let Err(e2) = subtransaction(|| store::report_error(id, &message)) {
            pgrx::warning!("outbox worker: endpoint {id}: recording the error: {e2}");
        }
        let now = Instant::now();
        if let Some(i) = self.endpoints.iter().position(|ep| ep.id == id) {
            self.retired.note(self.extension, &self.endpoints.swap_remove(i), now);
        }
        self.broken.insert(id, Instant::now() + ERROR_PAUSE);
    }

    fn reload_endpoints(&mut self) -> Result<()> {
        store::start_new_endpoints()?;
        let rows = store::load_endpoints()?;
        let now = Instant::now();
        let parked_cap = window().0;
        let mut next = Vec::with_capacity(rows.len());
        for mut row in rows {
            if self.broken.get(&row.id).is_some_and(|t| *t > now) {
                continue;
            }
            self.broken.remove(&row.id);
            let existing = self.endpoints.iter().position(|e| e.id == row.id).map(|i| self.endpoints.swap_remove(i));
            let config = match crate::config::Endpoint::parse(&row.name, &row.url, &row.kind, &row.topics, &row.options)
            {
                Ok(c) => c,
                Err(e) => {
                    pgrx::warning!("outbox worker: endpoint {:?} is skipped: {e}", row.name);
                    existing.map(|ep| self.retire(ep, now));
                    continue;
                }
            };
            if let Some(mut ep) = existing {
                if ep.reconfigure(&row, &config, &self.egress) {
                    next.push(ep);
                    continue;
                }
                // Built anew from where this state got to (`row` was read
                // before its last progress was written).
                if let Some(cursor) = self.retire(ep, now) {
                    row.cursor = cursor;
                }
            }
            // A new endpoint, or its topics or kind changed: (re)start from
            // the persisted cursor.
            match EndpointState::new(&row, config, self.next_incarnation, &self.source, &self.egress, parked_cap) {
                Ok(ep) => next.push(ep),
                Err(e) => pgrx::warning!("outbox worker: endpoint {:?} is skipped: {e}", row.name),
            }
            self.next_incarnation += 1;
        }
        // Left over: endpoints dropped (their ids do not come back).
        self.endpoints = next;
        // Entries of endpoints dropped while broken.
        self.broken.retain(|_, t| *t > now);
        shmem::want_commits(self.index, self.endpoints.iter().any(EndpointState::is_active));
        // Commits while no endpoint was active woke nobody.
        self.commits_unticked = true;
        Ok(())
    }

    /// Take a tick when an endpoint has read everything up to the latest
    /// one, when many commits were noted since the last tick, and at least
    /// once per poll interval even without new events (the oldest tick in
    /// use decides what rotation may remove, so it must move on when all
    /// is quiet).
    fn tick(&mut self) -> Result<()> {
        // Without commits noted since the last look there is nothing to
        // tick but prepared transactions, which the overdue tick takes.
        let caught_up =
            self.commits_unticked && self.endpoints.iter().any(|e| e.is_active() && e.read_tick() >= self.latest_tick);
        let ring = shmem::commit_ring(self.index);
        let many = ring.is_some_and(|ring| self.ticker.unread(ring) >= TICK_AFTER_COMMITS);
        let overdue = self.last_tick.elapsed() >= poll_interval();
        if !overdue && !many && (!caught_up || self.tick_may_wait(Instant::now())) {
            if caught_up {
                // Left for the pace: back by its end, however long this
                // step takes.
                self.commit_wakes.defer(self.last_tick + TICK_PACE);
            }
            return Ok(());
        }
        // Commits from now on wake the worker again (a step that found
        // commits waiting for a paced tick did not ask for that).
        shmem::worker_awake(self.index);
        self.commit_wakes.armed();
        let (latest, taken) = self.ticker.take(overdue, ring)?;
        if let Some(tick) = taken {
            self.ticks.insert(tick);
        }
        // Whatever committed before is in this tick or an earlier one.
        self.commits_unticked = false;
        if latest != self.latest_tick {
            self.latest_tick = latest;
            self.last_tick = Instant::now();
        }
        Ok(())
    }

    /// Whether commits noted since the last tick may wait for more before
    /// they are ticked (see COMMITS_TO_PACE): the rate is high, the last
    /// tick is less than TICK_PACE old, and fewer than TICK_GATHER commits
    /// were noted since. The step that comes after TICK_PACE, woken by a
    /// commit or by the latch's timeout (see `timeout`), ticks them.
    fn tick_may_wait(&self, now: Instant) -> bool {
        let Some(ring) = shmem::commit_ring(self.index) else {
            return false;
        };
        self.commit_rate.per_second() >= COMMITS_TO_PACE
            && now.saturating_duration_since(self.last_tick) < TICK_PACE
            && self.ticker.unread(ring) < TICK_GATHER
    }

    /// An endpoint's state is dropped: first write what it learned, or its
    /// delivered events would go out again. The cursor written, if it was.
    /// Its requests still out hold back its next state (`retired`).
    fn retire(&mut self, mut ep: EndpointState, now: Instant) -> Option<stream::Cursor> {
        self.retired.note(self.extension, &ep, now);
        match subtransaction(|| ep.write_back(now, true)) {
            Ok(()) => Some(ep.saved_cursor()),
            Err(e) => {
                pgrx::warning!("outbox worker: endpoint {}: {e}", ep.id);
                None
            }
        }
    }

    fn dispatch(&mut self, now: Instant) {
        for (id, requests) in self.retired.expire(now) {
            pgrx::warning!(
                "outbox worker: endpoint {id}: {requests} request(s) of its previous state did not report back \
                 in time; it no longer waits for them (one that has not gone out yet never will)"
            );
        }
        // An endpoint changed (paused, say) since this step read the
        // settings: send nothing before the next step has reloaded them.
        if self.config_version != Some(shmem::config_version(self.index)) {
            return;
        }
        let config = shmem::config_counter(self.index).zip(self.config_version);
        let mut jobs = Vec::new();
        for ep in &mut self.endpoints {
            if !self.retired.holds(self.extension, ep.id) {
                jobs.extend(ep.take_jobs(now, config));
            }
        }
        self.network.submit(jobs);
    }

    /// Rotation and tick cleanup, in a transaction of their own.
    fn maintain(&mut self) {
        let retention = guc::RETENTION_S.get().max(1) as f64;
        match transaction(|| {
            if store::pin_extension()?.0 != self.extension {
                return Ok(rotation::Done::Nothing); // the next step looks again
            }
            // A switch or a TRUNCATE is durable before emitters are told.
            Spi::run("SET LOCAL synchronous_commit = on")?;
            ticks::drop_old()?;
            rotation::maintain(retention)
        }) {
            Ok(rotation::Done::Switched(table)) => {
                // Committed: emitters may use the new table now. Then, in a
                // transaction that starts after that, bound the table left.
                shmem::publish_events_table(self.index, Some(table));
                pgrx::debug1!("outbox worker: outbox.events_{table} is now current");
                if let Err(e) = transaction(|| rotation::maintain(retention)) {
                    pgrx::warning!("outbox worker: table maintenance: {e}");
                }
            }
            Ok(done) => pgrx::debug2!("outbox worker: maintenance: {done:?}"),
            Err(e) => pgrx::warning!("outbox worker: table maintenance: {e}"),
        }
    }
}

/// Make every commit this step may have read events of durable before the
/// events go out: with synchronous_commit = off a commit returns before its
/// WAL is flushed, and a crash would undo a transaction whose events were
/// already delivered. Every transaction that emits records where its
/// commit record ends (write/commit.rs); flushing up to the latest such position
/// covers every commit the step saw. With synchronous commits it is
/// flushed already, and this returns at once.
fn flush_wal() {
    let end = shmem::commit_end();
    if end > 0 {
        // SAFETY: main thread; flushing WAL needs no transaction.
        unsafe { pg_sys::XLogFlush(end) };
    }
}

/// outbox.allowed_hosts (a setting that does not parse allows nothing) and
/// outbox.http_proxy.
fn read_egress() -> Egress {
    let allowed = guc::allowed_hosts().unwrap_or_else(|e| {
        pgrx::warning!("outbox worker: {e}; no endpoint can be reached until it is fixed");
        AllowList::nothing()
    });
    Egress { allowed, proxy: guc::http_proxy() }
}

/// When the worker's sleep ends: at `wanted`, or while a pause after an
/// error lasts, when it ends (nothing is done before; see Worker::step).
fn sleep_until(now: Instant, wanted: Instant, pause: Option<Instant>) -> Instant {
    match pause {
        Some(end) if end > now => end,
        _ => wanted,
    }
}

/// outbox.poll_interval: the longest the worker sleeps, and how often it
/// takes a tick when nothing else asks for one.
fn poll_interval() -> Duration {
    Duration::from_millis(guc::POLL_INTERVAL_MS.get().max(10) as u64)
}

/// The per-endpoint window: events and payload bytes held in memory.
fn window() -> (usize, usize) {
    (guc::WINDOW_EVENTS.get().max(1) as usize, guc::WINDOW_KB.get().max(1) as usize * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While a pause after an error lasts the worker sleeps exactly to its
    /// end: not longer because the sleep it wanted (the poll interval,
    /// from a wake-up during the pause) ends later, and not shorter.
    #[test]
    fn a_pause_after_an_error_ends_when_it_should() {
        let now = Instant::now();
        let (soon, later) = (now + Duration::from_millis(200), now + Duration::from_secs(1));
        let pause_end = now + Duration::from_millis(800);
        assert_eq!(sleep_until(now, later, Some(pause_end)), pause_end, "a wake-up during the pause");
        assert_eq!(sleep_until(now, soon, Some(pause_end)), pause_end);
        assert_eq!(sleep_until(now, later, Some(now - Duration::from_millis(1))), later, "over");
        assert_eq!(sleep_until(now, soon, None), soon);
    }
}
