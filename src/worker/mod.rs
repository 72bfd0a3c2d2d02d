//! The background worker: one per database named in `outbox.databases`.
//!
//! Its main thread is the Postgres side: it waits on its latch (set by
//! commits, by the network side and by signals), then runs one short
//! transaction that records outcomes, takes a tick and reads new events,
//! and finally hands ready events to the network side. It never holds a
//! transaction or snapshot while requests are in flight.

mod commit_order;
mod endpoint;
pub mod launcher;
mod parked;
mod rotation;
mod session;
mod store;

use crate::config;
use crate::egress::{AllowList, Egress};
use crate::guc;
use crate::net::{self, Job, Network, Outcome};
use crate::shmem;
use endpoint::EndpointState;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::Tick;

/// Events read per endpoint per step, so one step stays short.
const READ_PER_STEP: usize = 5_000;
/// Rows per read query.
const PAGE: usize = 1_000;
/// Ticks held in memory beyond the oldest one an endpoint reads from.
const MAX_TICKS_LOADED: i64 = 10_000;
/// How often rotation and tick cleanup run.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);
/// Endpoint rows are re-read at least this often, even unasked.
const RELOAD_EVERY: Duration = Duration::from_secs(10);

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
    shmem::release_slot(arg.value(), unsafe { pg_sys::MyProcPid });
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
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // One worker per database, whoever started it (a launcher that was
    // restarted does not know the workers of its predecessor).
    // SAFETY: MyProcPid is set in every process.
    let pid = unsafe { pg_sys::MyProcPid };
    if !shmem::claim_slot(index, pid) {
        return;
    }
    // SAFETY: registered before anything can fail, so the slot is given
    // back however this process ends.
    unsafe { pg_sys::before_shmem_exit(Some(release_on_exit), pg_sys::Datum::from(index)) };
    session::connect(db_oid, role_oid);
    let db = session::database_name();
    // SAFETY: connected.
    unsafe { shmem::publish_worker(index, pg_sys::MyDatabaseId) };

    let latch = unsafe { pg_sys::MyLatch } as usize;
    let wake: net::Waker = Arc::new(move || unsafe { set_latch_from_any_thread(latch as *mut pg_sys::Latch) });
    let network = match Network::start(2, wake) {
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
    worker.network.shutdown(Duration::from_millis(500));
    pgrx::log!("outbox worker in database {db:?} stopped");
}

struct Worker {
    slot: usize,
    /// CloudEvents source of this database's events.
    source: String,
    /// outbox.allowed_hosts and outbox.http_proxy, re-read on reload.
    egress: Arc<Egress>,
    network: Network,
    endpoints: Vec<EndpointState>,
    ticks: HashMap<i64, Tick>,
    latest_tick: i64,
    last_tick: Instant,
    commit_order: commit_order::CommitOrder,
    /// The oid of the extension the state below belongs to: a reinstall
    /// (DROP and CREATE EXTENSION) starts over from the new tables.
    extension: Option<u32>,
    config_generation: Option<u64>,
    next_generation: u64,
    last_reload: Instant,
    last_maintenance: Instant,
    /// The worker's role was found to be a superuser: stop.
    superuser: bool,
    /// After an error, wait this long before trying again.
    error_pause_until: Option<Instant>,
}

impl Worker {
    fn new(slot: usize, database: &str, network: Network) -> Worker {
        Worker {
            slot,
            source: format!("/outbox/{database}"),
            egress: Arc::new(read_egress()),
            network,
            endpoints: Vec::new(),
            ticks: HashMap::new(),
            latest_tick: 0,
            last_tick: Instant::now(),
            commit_order: commit_order::CommitOrder::default(),
            extension: None,
            config_generation: None,
            next_generation: 1,
            last_reload: Instant::now(),
            last_maintenance: Instant::now(),
            error_pause_until: None,
            superuser: false,
        }
    }

    /// After SIGHUP: targets are rebuilt when the allow-list changed.
    fn settings_reloaded(&mut self) {
        let egress = read_egress();
        if egress != *self.egress {
            self.egress = Arc::new(egress);
            self.config_generation = None; // reload endpoints next step
        }
    }

    /// How long to sleep when nothing wakes the latch.
    fn timeout(&self) -> Duration {
        let now = Instant::now();
        let mut until = now + poll_interval();
        for t in self.endpoints.iter().filter_map(EndpointState::next_wake) {
            until = until.min(t);
        }
        if let Some(t) = self.error_pause_until {
            until = until.max(t);
        }
        until.saturating_duration_since(now).max(Duration::from_millis(1))
    }

    fn step(&mut self) {
        let now = Instant::now();
        if self.error_pause_until.is_some_and(|t| t > now) {
            return;
        }
        // Before reading anything: a commit from now on wakes us again.
        shmem::worker_awake(self.slot);
        self.error_pause_until = None;
        self.apply_outcomes();

        let result = transaction(AssertUnwindSafe(|| self.sync()));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                pgrx::warning!("outbox worker: {e}");
                // Forget what may not have been written; start again from
                // the tables after a pause.
                self.extension = None;
                self.endpoints.clear();
                shmem::want_commits(self.slot, false);
                self.ticks.clear();
                self.error_pause_until = Some(Instant::now() + Duration::from_secs(1));
                return;
            }
        }
        self.dispatch(Instant::now());

        if self.extension.is_some() && self.last_maintenance.elapsed() >= MAINTAIN_EVERY {
            self.last_maintenance = Instant::now();
            let retention = guc::RETENTION_S.get().max(1) as f64;
            let slot = self.slot;
            match transaction(AssertUnwindSafe(|| {
                rotation::drop_old_ticks()?;
                rotation::maintain(slot, retention)
            })) {
                Ok(Ok(Some(what))) => pgrx::debug1!("outbox worker: {what}"),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => pgrx::warning!("outbox worker: table maintenance: {e}"),
                Err(e) => pgrx::warning!("outbox worker: table maintenance: {e}"),
            }
        }
    }

    fn apply_outcomes(&mut self) {
        let outcomes: Vec<Outcome> = self.network.outcomes().collect();
        let now = Instant::now();
        for o in outcomes {
            // Outcomes of state rebuilt since are dropped: the event is read
            // again from the tables.
            if let Some(ep) = self.endpoints.iter_mut().find(|e| e.id == o.endpoint_id && e.generation == o.generation)
            {
                ep.job_done();
                for (lane, position, result) in o.results {
                    ep.on_outcome(&lane, position, result, now);
                }
            }
        }
    }

    /// The database part of a step, in one transaction.
    fn sync(&mut self) -> Result<(), String> {
        // SAFETY: a catalog-cache lookup of our own role, in a transaction.
        if unsafe { pg_sys::superuser() } {
            self.superuser = true;
            return Ok(());
        }
        let extension = store::extension_oid()?;
        if extension != self.extension {
            // Installed, dropped or installed anew: nothing known so far
            // belongs to the tables now there.
            self.endpoints.clear();
            self.ticks.clear();
            shmem::want_commits(self.slot, false);
            self.extension = extension;
            self.config_generation = None;
            if extension.is_none() {
                return Ok(());
            }
            self.latest_tick = store::latest_tick()?;
        }
        if extension.is_none() {
            return Ok(());
        }
        self.write_back()?;

        let generation = shmem::config_generation(self.slot);
        if self.config_generation != Some(generation) || self.last_reload.elapsed() >= RELOAD_EVERY {
            rotation::publish_current(self.slot).map_err(|e| e.to_string())?;
            self.reload_endpoints()?;
            self.config_generation = Some(generation);
            self.last_reload = Instant::now();
        }
        let now = Instant::now();
        for ep in self.endpoints.iter_mut().filter(|e| e.parked_stale) {
            let heads = store::parked_lanes(ep.id, ep.config().options.on_dead == config::OnDead::Block)?;
            ep.load_parked(heads, now);
        }

        let (max_events, max_bytes) = window();
        for ep in &mut self.endpoints {
            ep.park_stuck_lanes(max_events, max_bytes, now);
        }
        self.flush_parks()?;
        self.tick()?;
        self.read_events()?;
        self.flush_parks()?;
        self.load_parked_heads(now)?;
        Ok(())
    }

    /// Write what the worker learned since the last step: parked and dead
    /// events, outcomes of parked events, disabled endpoints, progress.
    fn write_back(&mut self) -> Result<(), String> {
        self.flush_parks()?;
        let mut updates = Vec::new();
        Spi::connect_mut(|client| {
            for ep in &mut self.endpoints {
                store::write_parked(client, ep.id, &ep.parked.writes)?;
                ep.parked.writes.clear();
                if let Some(reason) = &ep.gone {
                    if ep.active {
                        store::disable_endpoint(client, ep.id, reason)?;
                        ep.active = false;
                    }
                }
                if let Some(update) = ep.progress() {
                    store::save_progress(client, &update)?;
                    updates.push(update);
                }
            }
            pgrx::spi::SpiResult::Ok(())
        })
        .map_err(|e| e.to_string())?;
        // Marked saved now; if the commit fails the step's error path
        // drops all state and reloads it from the tables.
        for update in &updates {
            if let Some(ep) = self.endpoints.iter_mut().find(|e| e.id == update.endpoint_id) {
                ep.saved(update);
            }
        }
        Ok(())
    }

    /// Copy the events endpoints moved out of their windows into
    /// outbox.parked. Must commit no later than the cursors that pass them.
    fn flush_parks(&mut self) -> Result<(), String> {
        Spi::connect_mut(|client| {
            for ep in self.endpoints.iter_mut().filter(|e| !e.to_park.is_empty()) {
                store::park(client, ep.id, &ep.to_park)?;
                ep.to_park.clear();
            }
            pgrx::spi::SpiResult::Ok(())
        })
        .map_err(|e| e.to_string())
    }

    /// Read the first rows of parked lanes that are due or moved on.
    fn load_parked_heads(&mut self, now: Instant) -> Result<(), String> {
        for ep in self.endpoints.iter_mut().filter(|e| e.active) {
            let (keys, solo, asked) = ep.parked_to_load(now);
            if asked.is_empty() {
                continue;
            }
            let block = ep.config().options.on_dead == config::OnDead::Block;
            let heads = store::parked_heads(ep.id, &keys, &solo, block)?;
            ep.parked_loaded(asked, heads, now);
        }
        Ok(())
    }

    fn reload_endpoints(&mut self) -> Result<(), String> {
        let rows = store::load_endpoints()?;
        let mut next = Vec::with_capacity(rows.len());
        for row in rows {
            let config = match config::Endpoint::parse(&row.name, &row.url, &row.kind, &row.topics, &row.options) {
                Ok(c) => c,
                Err(e) => {
                    pgrx::warning!("outbox worker: endpoint {:?} is skipped: {e}", row.name);
                    continue;
                }
            };
            let existing = self.endpoints.iter().position(|e| e.id == row.id);
            if let Some(mut ep) = existing.map(|i| self.endpoints.swap_remove(i)) {
                if ep.reconfigure(&row, &config, &self.egress) {
                    next.push(ep);
                    continue;
                }
            }
            // A new endpoint, or its topics or kind changed: (re)start from
            // the persisted cursor.
            match EndpointState::new(&row, config, self.next_generation, &self.source, &self.egress) {
                Ok(ep) => next.push(ep),
                Err(e) => pgrx::warning!("outbox worker: endpoint {:?} is skipped: {e}", row.name),
            }
            self.next_generation += 1;
        }
        self.endpoints = next;
        shmem::want_commits(self.slot, self.endpoints.iter().any(|e| e.active));
        Ok(())
    }

    /// Take a tick when an endpoint has read everything up to the latest
    /// one (more ticks would only cut the backlog into smaller batches). At
    /// least once per poll interval a tick is taken even without new
    /// events: the oldest tick in use decides what rotation may remove, so
    /// it must move on when all is quiet.
    fn tick(&mut self) -> Result<(), String> {
        let caught_up = self.endpoints.iter().any(|e| e.active && e.read.tick >= self.latest_tick);
        let overdue = self.last_tick.elapsed() >= poll_interval();
        if !caught_up && !overdue {
            return Ok(());
        }
        let order = &mut self.commit_order;
        let latest = store::take_tick(overdue, |txids| {
            if txids.len() > commit_order::MAX_ORDERED {
                return false;
            }
            if let Some(ring) = shmem::commit_ring() {
                order.read(ring);
            }
            order.sort(txids);
            true
        })?;
        if latest != self.latest_tick {
            self.latest_tick = latest;
            self.last_tick = Instant::now();
        }
        Ok(())
    }

    fn read_events(&mut self) -> Result<(), String> {
        let (max_events, max_bytes) = window();
        let latest = self.latest_tick;
        let Some(oldest) = self.endpoints.iter().filter(|e| e.active).map(|e| e.read.tick).min() else {
            return Ok(());
        };
        // The ticks endpoints read between, from the oldest position on
        // (bounded: an endpoint far behind catches up step by step).
        let missing: Vec<i64> =
            (oldest..=latest.min(oldest + MAX_TICKS_LOADED)).filter(|id| !self.ticks.contains_key(id)).collect();
        if !missing.is_empty() {
            for t in store::load_ticks(&missing)? {
                self.ticks.insert(t.id, t);
            }
        }

        for ep in self.endpoints.iter_mut().filter(|e| e.active) {
            let mut budget = READ_PER_STEP;
            loop {
                let room = ep.window_room(max_events, max_bytes).min(budget).min(PAGE);
                if room == 0 || ep.read.tick >= latest {
                    break;
                }
                let lo_id = ep.read.tick;
                let (Some(lo), Some(hi)) = (self.ticks.get(&lo_id), self.ticks.get(&(lo_id + 1))) else {
                    break; // beyond what is loaded: next step
                };
                let bytes = max_bytes.saturating_sub(ep.sched.bytes()).max(1) as i64;
                let page = store::read_batch(lo, hi, ep.read.after, &ep.like, room as i64, bytes)?;
                budget = budget.saturating_sub(page.events.len());
                for event in page.events {
                    ep.push(event);
                }
                if page.complete {
                    ep.read = store::Cursor { tick: lo_id + 1, after: None };
                }
            }
        }
        // Forget ticks no endpoint reads from anymore.
        let oldest = self.endpoints.iter().filter(|e| e.active).map(|e| e.read.tick).min().unwrap_or(latest);
        self.ticks.retain(|id, _| *id >= oldest);
        Ok(())
    }

    fn dispatch(&mut self, now: Instant) {
        // An endpoint changed (paused, say) since this step read the
        // settings: send nothing before the next step has reloaded them.
        if self.config_generation != Some(shmem::config_generation(self.slot)) {
            return;
        }
        for ep in &mut self.endpoints {
            for events in ep.take_jobs(now) {
                self.network.submit(Job {
                    endpoint_id: ep.id,
                    generation: ep.generation,
                    target: ep.target.clone(),
                    events,
                });
            }
        }
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

/// outbox.poll_interval: the longest the worker sleeps, and how often it
/// takes a tick when nothing else asks for one.
fn poll_interval() -> Duration {
    Duration::from_millis(guc::POLL_INTERVAL_MS.get().max(10) as u64)
}

/// The per-endpoint window: events and payload bytes held in memory.
fn window() -> (usize, usize) {
    (guc::WINDOW_EVENTS.get().max(1) as usize, guc::WINDOW_KB.get().max(1) as usize * 1024)
}

/// Run `f` in its own transaction. A Postgres error inside aborts the
/// transaction and comes back as `Err` instead of ending the worker.
fn transaction<R>(f: AssertUnwindSafe<impl FnOnce() -> R>) -> Result<R, String> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let body = AssertUnwindSafe(move || {
        let r = (f.0)();
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(r)
    });
    PgTryBuilder::new(body)
        .catch_others(|e| {
            let message = match &e {
                pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
                    r.message().to_string()
                }
                pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            };
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(message)
        })
        .execute()
}
