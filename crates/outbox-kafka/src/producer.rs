//! The producer: metadata, partitioning, idempotent batches, retries.

use crate::batch::{self, Stamp, BATCH_OVERHEAD};
use crate::conn::{self, Broker, ConnError, Held, ResponseBudget, Settings};
use crate::error::*;
use crate::response::{Metadata, Produce, ProducePartition};
use crate::{partition_for_key, Compression, Config, Delivered, ProduceError, Record};
use bytes::Bytes;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{InitProducerIdRequest, MetadataRequest, ProduceRequest, ProducerId, TopicName};
use kafka_protocol::protocol::StrBytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;
use tokio::time::{sleep_until, timeout_at, Instant};

/// Attempts per batch before its records are reported failed.
const MAX_ATTEMPTS: u32 = 6;
/// Cached topic metadata older than this is refreshed before use.
const METADATA_MAX_AGE: Duration = Duration::from_secs(300);
/// A batch whose values exceed this is compressed under block_in_place.
const HEAVY_BATCH_BYTES: usize = 256 * 1024;
/// Partitions of one topic, at most (Kafka sets no limit; clusters hold a
/// few hundred thousand in all).
const MAX_PARTITIONS: usize = 1_000_000;
/// Produce request bytes besides the batches: header, client id, topic, lengths.
const REQUEST_OVERHEAD: usize = 128;
/// Versions this client speaks.
const PRODUCE_VERSIONS: std::ops::RangeInclusive<i16> = 3..=11;
const PRODUCE_VERSIONS_ZSTD: std::ops::RangeInclusive<i16> = 7..=11;
const METADATA_VERSIONS: std::ops::RangeInclusive<i16> = 4..=12;
const INIT_PRODUCER_ID_VERSIONS: std::ops::RangeInclusive<i16> = 0..=4;

/// An idempotent Kafka producer. Cheap to clone and to share (`Arc` inside);
/// connects lazily, on the first `send`.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("bootstrap", &self.inner.bootstrap).finish_non_exhaustive()
    }
}

struct Inner {
    settings: Settings,
    bootstrap: Vec<String>,
    compression: Compression,
    request_timeout: Duration,
    max_request_bytes: usize,
    auto_create: bool,
    brokers: Mutex<HashMap<String, Arc<Broker>>>,
    meta: Mutex<Meta>,
    identity: tokio::sync::Mutex<IdState>,
    partitions: Mutex<HashMap<(String, i32), SharedPart>>,
    round_robin: AtomicUsize,
    closed: AtomicBool,
}

#[derive(Default)]
struct Meta {
    nodes: BTreeMap<i32, String>,
    topics: HashMap<String, TopicMeta>,
}

#[derive(Clone, Debug)]
struct TopicMeta {
    /// Leader node per partition id; -1 when the partition has none.
    leaders: Vec<i32>,
    fetched: Instant,
    /// A refresh was wanted but failed: fetch again before the next use.
    stale: bool,
}

/// The producer id and epoch batches are stamped with; `generation` counts
/// (re-)initialisations, and owns the per-partition sequence numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    producer_id: i64,
    epoch: i16,
    generation: u64,
}

#[derive(Default)]
struct IdState {
    current: Option<Identity>,
    generation: u64,
}

/// Per partition, guarded so that one produce request at a time is in
/// flight for it (which keeps both order and sequence numbers simple).
#[derive(Default)]
struct PartState {
    /// The identity generation `next_seq` belongs to.
    owner: Option<u64>,
    next_seq: i32,
    /// The last batch's outcome is unknown (it may have been written): the
    /// sequence numbers cannot be reused under this identity.
    unresolved: bool,
}

struct Chunk {
    idx: Vec<usize>,
    bytes: Option<Bytes>,
    stamped_generation: u64,
    maybe_written: bool,
    attempts: u32,
    last_err: Option<ProduceError>,
}

impl Chunk {
    fn new(idx: Vec<usize>) -> Chunk {
        Chunk { idx, bytes: None, stamped_generation: 0, maybe_written: false, attempts: 0, last_err: None }
    }
}

struct Job {
    partition: i32,
    guard: OwnedMutexGuard<PartState>,
    chunks: VecDeque<Chunk>,
}

type SharedPart = Arc<tokio::sync::Mutex<PartState>>;
type Results = Vec<Option<Result<Delivered, ProduceError>>>;

fn backoff(attempts: u32) -> Duration {
    Duration::from_millis((50u64 << attempts.min(5)).min(1000))
}

impl Producer {
    /// A producer for `config`. Nothing connects until the first `send`.
    /// A bad `tls.ca_pem` is reported by `send` (as `Unreachable`).
    pub fn new(config: Config) -> Producer {
        let tls = config.tls.as_ref().map(conn::tls_connector);
        let settings = Settings {
            client_id: config.client_id,
            tls,
            sasl: config.sasl,
            resolver: config.resolver,
            connect_timeout: config.connect_timeout,
            responses: ResponseBudget::new(),
        };
        Producer {
            inner: Arc::new(Inner {
                settings,
                bootstrap: config.bootstrap,
                compression: config.compression,
                request_timeout: config.request_timeout,
                max_request_bytes: config.max_request_bytes,
                auto_create: config.allow_auto_create_topics,
                brokers: Mutex::new(HashMap::new()),
                meta: Mutex::new(Meta::default()),
                identity: tokio::sync::Mutex::new(IdState::default()),
                partitions: Mutex::new(HashMap::new()),
                round_robin: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Produce `records` to `topic` with acks=all, idempotently.
    ///
    /// A record with a key goes to `partition_for_key(key, partitions)`;
    /// records without a key all go to one partition, chosen round-robin
    /// among partitions with a leader, per call. Records of one call for
    /// one partition go in one batch, in input order (several batches, sent
    /// one after the other, when they exceed `max_request_bytes`).
    ///
    /// Returns one result per record, in input order. Takes at most about
    /// `request_timeout` (plus a connect in progress). If a batch fails
    /// with a retriable error, the later batches of that partition in this
    /// call are not sent and get the same error, so that a caller retrying
    /// the failed records keeps their order.
    pub async fn send(&self, topic: &str, records: Vec<Record>) -> Vec<Result<Delivered, ProduceError>> {
        let inner = &*self.inner;
        let n = records.len();
        if n == 0 {
            return Vec::new();
        }
        if inner.closed.load(Ordering::SeqCst) {
            return vec![Err(ProduceError::unreachable("the producer is closed")); n];
        }
        let deadline = Instant::now() + inner.request_timeout;
        let mut out: Results = vec![None; n];
        inner.send(topic, &records, deadline, &mut out).await;
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(ProduceError::retriable(REQUEST_TIMED_OUT, "not sent before the deadline")))
            })
            .collect()
    }

    /// Close all connections. Later `send` calls fail with `Unreachable`.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let brokers: Vec<Arc<Broker>> = self.inner.brokers.lock().unwrap().drain().map(|(_, b)| b).collect();
        for b in brokers {
            b.disconnect().await;
        }
    }
}

impl Inner {
    fn broker(&self, addr: &str) -> Arc<Broker> {
        self.brokers
            .lock()
            .unwrap()
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(Broker::new(addr.into())))
            .clone()
    }

    fn node_addr(&self, node: i32) -> Option<String> {
        self.meta.lock().unwrap().nodes.get(&node).cloned()
    }

    /// Brokers to ask for metadata or a producer id: known brokers, then
    /// the bootstrap list, starting at a rotating position.
    fn candidates(&self) -> Vec<String> {
        let mut list: Vec<String> = self.meta.lock().unwrap().nodes.values().cloned().collect();
        for b in &self.bootstrap {
            if !list.contains(b) {
                list.push(b.clone());
            }
        }
        if !list.is_empty() {
            let start = self.round_robin.fetch_add(1, Ordering::Relaxed) % list.len();
            list.rotate_left(start);
        }
        list
    }

    async fn send(&self, topic: &str, records: &[Record], deadline: Instant, out: &mut Results) {
        // Metadata, with a few quick retries.
        let mut attempt = 0;
        let tm = loop {
            match self.topic_meta(topic, deadline).await {
                Ok(tm) => break tm,
                Err(e) => {
                    attempt += 1;
                    let unknown_topic = e.code() == Some(UNKNOWN_TOPIC_OR_PARTITION);
                    let give_up = (e.is_fatal() && !unknown_topic) || attempt >= 3;
                    let wait = Instant::now() + backoff(attempt);
                    if give_up || wait >= deadline {
                        out.iter_mut().for_each(|o| *o = Some(Err(e.clone())));
                        return;
                    }
                    sleep_until(wait).await;
                }
            }
        };

        // Partition the records.
        let count = tm.leaders.len() as i32;
        let mut by_partition: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
        let mut unkeyed = None;
        for (i, r) in records.iter().enumerate() {
            let p = match &r.key {
                Some(k) => partition_for_key(k, count),
                None => *unkeyed.get_or_insert_with(|| self.pick_unkeyed(&tm)),
            };
            by_partition.entry(p).or_default().push(i);
        }

        // Split each partition's records into batches that fit a request.
        let limit = self
            .max_request_bytes
            .saturating_sub(REQUEST_OVERHEAD + BATCH_OVERHEAD + topic.len() + self.settings.client_id.len());
        let mut plans: Vec<(i32, VecDeque<Chunk>)> = Vec::new();
        for (p, idx) in by_partition {
            let mut chunks = VecDeque::new();
            let (mut cur, mut cur_bytes) = (Vec::new(), 0usize);
            for i in idx {
                let bound = batch::record_size_bound(&records[i]);
                if bound > limit {
                    out[i] = Some(Err(ProduceError::fatal(
                        MESSAGE_TOO_LARGE,
                        format!(
                            "the record is about {bound} bytes when serialized, more than max_request_bytes ({}) allows",
                            self.max_request_bytes
                        ),
                    )));
                    continue;
                }
                if !cur.is_empty() && cur_bytes + bound > limit {
                    chunks.push_back(Chunk::new(std::mem::take(&mut cur)));
                    cur_bytes = 0;
                }
                cur.push(i);
                cur_bytes += bound;
            }
            if !cur.is_empty() {
                chunks.push_back(Chunk::new(cur));
            }
            if !chunks.is_empty() {
                plans.push((p, chunks));
            }
        }

        // One request in flight per partition: take the partitions' locks,
        // in partition order (no deadlock between concurrent calls).
        let mut jobs: Vec<Job> = Vec::new();
        let mut plans = plans.into_iter();
        while let Some((partition, chunks)) = plans.next() {
            let state = self.partition_state(topic, partition);
            match timeout_at(deadline, state.lock_owned()).await {
                Ok(guard) => jobs.push(Job { partition, guard, chunks }),
                Err(_) => {
                    let e = ProduceError::retriable(
                        REQUEST_TIMED_OUT,
                        "timed out waiting for an earlier send to the same partition",
                    );
                    for (_, chunks) in std::iter::once((partition, chunks)).chain(plans) {
                        for c in chunks {
                            fail(out, &c.idx, &e);
                        }
                    }
                    for mut j in jobs {
                        fail_job(&mut j, e.clone(), out);
                    }
                    return;
                }
            }
        }

        self.run(topic, records, tm, jobs, deadline, out).await;
    }

    async fn run(
        &self,
        topic: &str,
        records: &[Record],
        mut tm: TopicMeta,
        mut jobs: Vec<Job>,
        deadline: Instant,
        out: &mut Results,
    ) {
        let mut refresh = false;
        let mut unknown_topic = 0;
        loop {
            if refresh {
                // Until a refresh succeeds, the next call fetches metadata first.
                if let Some(t) = self.meta.lock().unwrap().topics.get_mut(topic) {
                    t.stale = true;
                }
            }
            jobs.retain(|j| !j.chunks.is_empty());
            if jobs.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for j in &mut jobs {
                    let e = j.chunks[0].last_err.clone().unwrap_or_else(|| {
                        ProduceError::retriable(REQUEST_TIMED_OUT, "request_timeout ran out before the batch was sent")
                    });
                    fail_job(j, e, out);
                }
                return;
            }
            let mut failed_round = false;

            if refresh {
                refresh = false;
                match self.fetch_metadata(topic, deadline).await {
                    Ok(t) => tm = t,
                    Err(e) => {
                        let is_unknown = e.code() == Some(UNKNOWN_TOPIC_OR_PARTITION);
                        if is_unknown {
                            unknown_topic += 1;
                        }
                        if e.is_fatal() && (!is_unknown || unknown_topic >= 3) {
                            for j in &mut jobs {
                                fail_job(j, e.clone(), out);
                            }
                            return;
                        }
                        for j in &mut jobs {
                            let head = &mut j.chunks[0];
                            head.attempts += 1;
                            head.last_err = Some(e.clone());
                        }
                        refresh = true;
                        self.give_up_exhausted(&mut jobs, out);
                        self.pause(&jobs, deadline).await;
                        continue;
                    }
                }
            }

            // The producer identity; a new one if a partition's last batch
            // has an unknown outcome under the current one.
            let mut id = match self.identity(None, deadline).await {
                Ok(id) => Some(id),
                Err(e) => {
                    if e.is_fatal() {
                        for j in &mut jobs {
                            fail_job(j, e.clone(), out);
                        }
                        return;
                    }
                    for j in &mut jobs {
                        j.chunks[0].attempts += 1;
                        j.chunks[0].last_err = Some(e.clone());
                    }
                    None
                }
            };
            if let Some(cur) = id {
                if cur.producer_id >= 0
                    && jobs.iter().any(|j| j.guard.unresolved && j.guard.owner == Some(cur.generation))
                {
                    match self.identity(Some(cur), deadline).await {
                        Ok(new) => id = Some(new),
                        Err(e) => {
                            for j in jobs.iter_mut().filter(|j| j.guard.unresolved) {
                                j.chunks[0].attempts += 1;
                                j.chunks[0].last_err = Some(e.clone());
                            }
                            id = None;
                        }
                    }
                }
            }
            let Some(id) = id else {
                self.give_up_exhausted(&mut jobs, out);
                self.pause(&jobs, deadline).await;
                continue;
            };

            // Stamp each partition's next batch and group them by leader.
            let now_ms = now_millis();
            let mut groups: BTreeMap<String, (Vec<usize>, usize)> = BTreeMap::new();
            for (ji, j) in jobs.iter_mut().enumerate() {
                let leader = tm.leaders.get(j.partition as usize).copied().unwrap_or(-1);
                let Some(addr) = (leader >= 0).then(|| self.node_addr(leader)).flatten() else {
                    let head = &mut j.chunks[0];
                    head.attempts += 1;
                    head.last_err = Some(ProduceError::retriable(
                        LEADER_NOT_AVAILABLE,
                        format!("partition {} of {topic} has no leader", j.partition),
                    ));
                    refresh = true;
                    failed_round = true;
                    continue;
                };
                if let Err(e) = self.prepare(j, id, records, now_ms, deadline).await {
                    // Nothing of the partition behind it goes either.
                    fail_job(j, e, out);
                    continue;
                }
                let size = j.chunks[0].bytes.as_ref().map_or(0, Bytes::len);
                let group = groups.entry(addr).or_default();
                if group.0.is_empty() || group.1 + size <= self.max_request_bytes {
                    group.0.push(ji);
                    group.1 += size;
                }
            }

            // One produce request per leader, concurrently.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout_ms = (remaining.as_millis() * 9 / 10).clamp(1, i32::MAX as u128) as i32;
            let calls = groups.iter().map(|(addr, (jis, _))| {
                let partition_data = jis
                    .iter()
                    .map(|&ji| {
                        PartitionProduceData::default()
                            .with_index(jobs[ji].partition)
                            .with_records(jobs[ji].chunks[0].bytes.clone())
                    })
                    .collect();
                let req = ProduceRequest::default().with_acks(-1).with_timeout_ms(timeout_ms).with_topic_data(vec![
                    TopicProduceData::default()
                        .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                        .with_partition_data(partition_data),
                ]);
                self.produce(addr, req, deadline)
            });
            let results = futures_util::future::join_all(calls).await;

            let mut reinit = false;
            for ((_, (jis, _)), result) in groups.iter().zip(results) {
                match result {
                    Err(ConnError::Auth { code, message }) => {
                        let e = ProduceError::fatal(code, message);
                        for j in &mut jobs {
                            fail_job(j, e.clone(), out);
                        }
                        return;
                    }
                    Err(ConnError::Unsupported(m)) => {
                        let code = if self.compression == Compression::Zstd {
                            UNSUPPORTED_COMPRESSION_TYPE
                        } else {
                            UNSUPPORTED_VERSION
                        };
                        for &ji in jis {
                            fail_job(&mut jobs[ji], ProduceError::fatal(code, m.clone()), out);
                        }
                    }
                    Err(ConnError::Unreachable(m)) => {
                        refresh = true;
                        failed_round = true;
                        for &ji in jis {
                            let head = &mut jobs[ji].chunks[0];
                            head.attempts += 1;
                            head.last_err = Some(ProduceError::unreachable(m.clone()));
                        }
                    }
                    Err(ConnError::Lost { message, sent, timed_out }) => {
                        refresh = true;
                        failed_round = true;
                        let code = if timed_out { REQUEST_TIMED_OUT } else { NETWORK_EXCEPTION };
                        for &ji in jis {
                            let head = &mut jobs[ji].chunks[0];
                            head.attempts += 1;
                            head.maybe_written |= sent;
                            head.last_err = Some(ProduceError::retriable(code, message.clone()));
                        }
                    }
                    Ok(resp) => {
                        // Each partition's entry (the first), found in one
                        // pass: a scan of the response per partition would
                        // cost partitions × entries, on the runtime's thread.
                        let mut entries: HashMap<i32, Option<&ProducePartition>> =
                            jis.iter().map(|&ji| (jobs[ji].partition, None)).collect();
                        let ours = resp.responses.iter().filter(|t| t.name == topic);
                        for p in ours.flat_map(|t| &t.partition_responses) {
                            if let Some(slot @ None) = entries.get_mut(&p.index) {
                                *slot = Some(p);
                            }
                        }
                        for &ji in jis {
                            let part = entries.get(&jobs[ji].partition).copied().flatten();
                            let outcome = self.absorb(topic, &mut jobs[ji], part, id, out);
                            refresh |= outcome.refresh;
                            reinit |= outcome.reinit;
                            failed_round |= outcome.failed;
                        }
                    }
                }
            }
            if reinit {
                if let Err(e) = self.identity(Some(id), deadline).await {
                    for j in &mut jobs {
                        if let Some(head) = j.chunks.front_mut() {
                            head.last_err = Some(e.clone());
                        }
                    }
                }
            }
            self.give_up_exhausted(&mut jobs, out);
            if failed_round {
                self.pause(&jobs, deadline).await;
            }
        }
    }

    /// Make sure the head batch of `j` is encoded and stamped for `id`.
    async fn prepare(
        &self,
        j: &mut Job,
        id: Identity,
        records: &[Record],
        now_ms: i64,
        deadline: Instant,
    ) -> Result<(), ProduceError> {
        let st = &mut *j.guard;
        if st.owner != Some(id.generation) {
            // A new identity: a new sequence space for every partition.
            *st = PartState { owner: Some(id.generation), next_seq: 0, unresolved: false };
        }
        let stamp = if id.producer_id >= 0 {
            Stamp { producer_id: id.producer_id, producer_epoch: id.epoch, base_sequence: st.next_seq }
        } else {
            Stamp { producer_id: -1, producer_epoch: -1, base_sequence: -1 }
        };
        let head = j.chunks.front_mut().expect("a pending batch");
        match &head.bytes {
            None => {
                let encode =
                    || batch::encode_batch(head.idx.iter().map(|&i| &records[i]), self.compression, stamp, now_ms);
                // Compressing a large batch is CPU-bound for a long moment
                // (gzip: tens of ms per MiB): the runtime's other tasks move
                // to another thread meanwhile. Its turn (two such moments
                // at once in the process) is waited for within the call's
                // deadline, like everything else in it.
                let bytes: usize = head.idx.iter().map(|&i| records[i].value.len()).sum();
                let heavy = self.compression != Compression::None && bytes > HEAVY_BATCH_BYTES;
                let encoded = timeout_at(deadline, crate::cpu_bound(heavy, encode)).await.map_err(|_| {
                    ProduceError::retriable(
                        REQUEST_TIMED_OUT,
                        "request_timeout ran out while the batch waited to be compressed",
                    )
                })?;
                let b = encoded.map_err(|e| {
                    if self.compression == Compression::Zstd {
                        ProduceError::fatal(UNSUPPORTED_COMPRESSION_TYPE, e)
                    } else {
                        ProduceError::fatal(CORRUPT_MESSAGE, format!("cannot encode the batch: {e}"))
                    }
                })?;
                head.bytes = Some(Bytes::from(b));
            }
            Some(b) if head.stamped_generation != id.generation => {
                // Re-initialised since this batch was stamped.
                let mut v = b.to_vec();
                batch::restamp(&mut v, stamp);
                head.bytes = Some(Bytes::from(v));
            }
            Some(_) => {}
        }
        head.stamped_generation = id.generation;
        Ok(())
    }

    async fn produce(&self, addr: &str, req: ProduceRequest, deadline: Instant) -> Result<Held<Produce>, ConnError> {
        let versions = if self.compression == Compression::Zstd { PRODUCE_VERSIONS_ZSTD } else { PRODUCE_VERSIONS };
        self.broker(addr).call(&self.settings, &req, versions, deadline).await.map(|(r, _)| r)
    }

    /// Apply the produce response's entry for `j`'s partition (None: the
    /// response lacks it) to the head batch of `j`.
    fn absorb(
        &self,
        topic: &str,
        j: &mut Job,
        part: Option<&ProducePartition>,
        id: Identity,
        out: &mut Results,
    ) -> Outcome {
        let mut o = Outcome::default();
        let head = j.chunks.front_mut().expect("a pending batch");
        let Some(part) = part else {
            head.attempts += 1;
            head.maybe_written = true;
            head.last_err = Some(ProduceError::retriable(
                NETWORK_EXCEPTION,
                format!("the broker's response lacks partition {} of {topic}", j.partition),
            ));
            o.failed = true;
            return o;
        };
        let code = part.error_code;
        let mut message = part.error_message.clone().unwrap_or_default();
        for (batch_index, m) in &part.record_errors {
            if message.len() > MAX_MESSAGE_BYTES {
                break; // the error keeps no more
            }
            if let Some(m) = m {
                message.push_str(&format!("; record {batch_index}: {m}"));
            }
        }
        let describe = |what: &str| {
            let detail = if message.is_empty() { String::new() } else { format!(": {message}") };
            format!("{what} partition {} of {topic}{detail}", j.partition)
        };
        match code {
            NONE | DUPLICATE_SEQUENCE_NUMBER => {
                let head = j.chunks.pop_front().expect("a pending batch");
                let base = if part.base_offset >= 0 { Some(part.base_offset) } else { None };
                for (k, &i) in head.idx.iter().enumerate() {
                    // The broker's number: past the end of the range, no offset.
                    let offset = base.and_then(|b| b.checked_add(k as i64)).unwrap_or(-1);
                    out[i] = Some(Ok(Delivered { partition: j.partition, offset }));
                }
                if id.producer_id >= 0 {
                    j.guard.next_seq = batch::next_sequence(j.guard.next_seq, head.idx.len());
                }
            }
            MESSAGE_TOO_LARGE | RECORD_LIST_TOO_LARGE if head.idx.len() > 1 => {
                // Too big for this topic's limit: split it (it was not written,
                // so its sequence numbers are free).
                let head = j.chunks.pop_front().expect("a pending batch");
                let mut first = head.idx;
                let second = first.split_off(first.len() / 2);
                j.chunks.push_front(Chunk::new(second));
                j.chunks.push_front(Chunk::new(first));
            }
            OUT_OF_ORDER_SEQUENCE_NUMBER | UNKNOWN_PRODUCER_ID | INVALID_PRODUCER_EPOCH | PRODUCER_FENCED => {
                // The broker lost or rejected our producer state: start over
                // with a new producer id and sequence 0.
                head.attempts += 1;
                head.last_err = Some(ProduceError::retriable(code, describe("producing to")));
                o.reinit = true;
                o.failed = true;
            }
            c if !is_retriable(c) && c != UNKNOWN_TOPIC_OR_PARTITION => {
                let head = j.chunks.pop_front().expect("a pending batch");
                fail(out, &head.idx, &ProduceError::fatal(c, describe("producing to")));
            }
            c => {
                head.attempts += 1;
                head.last_err = Some(ProduceError::retriable(c, describe("producing to")));
                if matches!(
                    c,
                    REQUEST_TIMED_OUT | NOT_ENOUGH_REPLICAS_AFTER_APPEND | UNKNOWN_SERVER_ERROR | NETWORK_EXCEPTION
                ) {
                    head.maybe_written = true;
                }
                if matches!(
                    c,
                    NOT_LEADER_OR_FOLLOWER
                        | LEADER_NOT_AVAILABLE
                        | UNKNOWN_TOPIC_OR_PARTITION
                        | FENCED_LEADER_EPOCH
                        | 8
                        | 9
                        | 75
                ) {
                    o.refresh = true;
                }
                o.failed = true;
            }
        }
        o
    }

    /// Report the batches that used up their attempts, and the batches
    /// queued behind them in the same partition.
    fn give_up_exhausted(&self, jobs: &mut [Job], out: &mut Results) {
        for j in jobs.iter_mut() {
            if j.chunks.front().is_some_and(|h| h.attempts >= MAX_ATTEMPTS) {
                let e = j.chunks[0]
                    .last_err
                    .clone()
                    .unwrap_or_else(|| ProduceError::retriable(REQUEST_TIMED_OUT, "attempts exhausted"));
                fail_job(j, e, out);
            }
        }
    }

    async fn pause(&self, jobs: &[Job], deadline: Instant) {
        let attempts = jobs.iter().filter_map(|j| j.chunks.front()).map(|h| h.attempts).max().unwrap_or(1);
        sleep_until((Instant::now() + backoff(attempts)).min(deadline)).await;
    }

    fn partition_state(&self, topic: &str, partition: i32) -> SharedPart {
        self.partitions.lock().unwrap().entry((topic.to_string(), partition)).or_default().clone()
    }

    fn pick_unkeyed(&self, tm: &TopicMeta) -> i32 {
        let available: Vec<i32> =
            tm.leaders.iter().enumerate().filter(|(_, &l)| l >= 0).map(|(p, _)| p as i32).collect();
        let n = self.round_robin.fetch_add(1, Ordering::Relaxed);
        if available.is_empty() {
            (n % tm.leaders.len()) as i32
        } else {
            available[n % available.len()]
        }
    }

    /// Cached metadata for `topic`, fetched when missing or old.
    async fn topic_meta(&self, topic: &str, deadline: Instant) -> Result<TopicMeta, ProduceError> {
        let cached = self.meta.lock().unwrap().topics.get(topic).cloned();
        match cached {
            Some(tm) if !tm.stale && tm.fetched.elapsed() < METADATA_MAX_AGE => Ok(tm),
            Some(tm) => match self.fetch_metadata(topic, deadline).await {
                Err(e) if !e.is_fatal() => Ok(tm),
                other => other,
            },
            None => self.fetch_metadata(topic, deadline).await,
        }
    }

    async fn fetch_metadata(&self, topic: &str, deadline: Instant) -> Result<TopicMeta, ProduceError> {
        let req = MetadataRequest::default()
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(TopicName(StrBytes::from_string(topic.to_string()))))
            ]))
            .with_allow_auto_topic_creation(self.auto_create);
        let mut last = String::from("no bootstrap servers configured");
        for addr in self.candidates() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let until = deadline.min(now + self.settings.connect_timeout * 2);
            match self.broker(&addr).call(&self.settings, &req, METADATA_VERSIONS, until).await {
                Ok((resp, _)) => return self.absorb_metadata(topic, &resp),
                Err(ConnError::Auth { code, message }) => return Err(ProduceError::fatal(code, message)),
                Err(ConnError::Unsupported(m)) => return Err(ProduceError::fatal(UNSUPPORTED_VERSION, m)),
                Err(ConnError::Unreachable(m)) | Err(ConnError::Lost { message: m, .. }) => last = m,
            }
        }
        Err(ProduceError::unreachable(format!("no broker answered a metadata request: {last}")))
    }

    fn absorb_metadata(&self, topic: &str, resp: &Metadata) -> Result<TopicMeta, ProduceError> {
        let mut meta = self.meta.lock().unwrap();
        if !resp.brokers.is_empty() {
            meta.nodes = resp
                .brokers
                .iter()
                .map(|b| {
                    let host = b.host.as_str();
                    let addr =
                        if host.contains(':') { format!("[{host}]:{}", b.port) } else { format!("{host}:{}", b.port) };
                    (b.node_id, addr)
                })
                .collect();
        }
        let t =
            resp.topics.iter().find(|t| t.name.as_deref() == Some(topic)).ok_or_else(|| {
                ProduceError::retriable(LEADER_NOT_AVAILABLE, format!("no metadata for topic {topic}"))
            })?;
        match t.error_code {
            NONE => {}
            UNKNOWN_TOPIC_OR_PARTITION => {
                meta.topics.remove(topic);
                return Err(ProduceError::fatal(
                    UNKNOWN_TOPIC_OR_PARTITION,
                    format!("topic {topic} does not exist (and the broker did not create it)"),
                ));
            }
            code => return Err(ProduceError::from_code(code, format!("metadata for topic {topic}"))),
        }
        let n = t.partitions.iter().map(|p| p.partition_index.saturating_add(1)).max().unwrap_or(0).max(0) as usize;
        // The leaders' table has a slot per partition up to the highest
        // number the broker names: a number no topic has would allocate
        // gigabytes from one field of one answer.
        if n > MAX_PARTITIONS {
            return Err(ProduceError::retriable(
                UNKNOWN_TOPIC_OR_PARTITION,
                format!("metadata for topic {topic} names partition {}, more than {MAX_PARTITIONS}", n - 1),
            ));
        }
        if n == 0 {
            return Err(ProduceError::retriable(LEADER_NOT_AVAILABLE, format!("topic {topic} has no partitions yet")));
        }
        let mut leaders = vec![-1; n];
        for p in &t.partitions {
            if p.partition_index >= 0 {
                leaders[p.partition_index as usize] =
                    if p.error_code == NONE || p.error_code == 9 { p.leader_id } else { -1 };
            }
        }
        let tm = TopicMeta { leaders, fetched: Instant::now(), stale: false };
        meta.topics.insert(topic.to_string(), tm.clone());
        Ok(tm)
    }

    /// The current producer identity; a new one if `stale` is current.
    async fn identity(&self, stale: Option<Identity>, deadline: Instant) -> Result<Identity, ProduceError> {
        let Ok(mut st) = timeout_at(deadline, self.identity.lock()).await else {
            return Err(ProduceError::retriable(REQUEST_TIMED_OUT, "timed out waiting for InitProducerId"));
        };
        if let Some(cur) = st.current {
            if stale != Some(cur) {
                return Ok(cur);
            }
        }
        let (producer_id, epoch) = self.init_producer_id(deadline).await?;
        st.generation += 1;
        let id = Identity { producer_id, epoch, generation: st.generation };
        st.current = Some(id);
        Ok(id)
    }

    /// InitProducerId (no transactional id): a fresh producer id, epoch 0.
    /// A broker without the API gets a non-idempotent producer (id -1).
    async fn init_producer_id(&self, deadline: Instant) -> Result<(i64, i16), ProduceError> {
        let req = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(i32::MAX)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        let mut last = ProduceError::unreachable("no bootstrap servers configured");
        for addr in self.candidates() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let until = deadline.min(now + self.settings.connect_timeout * 2);
            match self.broker(&addr).call(&self.settings, &req, INIT_PRODUCER_ID_VERSIONS, until).await {
                Ok((resp, _)) if resp.error_code == NONE => return Ok((resp.producer_id, resp.producer_epoch)),
                Ok((resp, _)) => {
                    last = ProduceError::from_code(resp.error_code, format!("InitProducerId refused by {addr}"));
                    if last.is_fatal() {
                        return Err(last);
                    }
                }
                Err(ConnError::Unsupported(_)) => return Ok((-1, -1)),
                Err(ConnError::Auth { code, message }) => return Err(ProduceError::fatal(code, message)),
                Err(ConnError::Unreachable(m)) => last = ProduceError::unreachable(m),
                Err(ConnError::Lost { message, timed_out, .. }) => {
                    last =
                        ProduceError::retriable(if timed_out { REQUEST_TIMED_OUT } else { NETWORK_EXCEPTION }, message)
                }
            }
        }
        Err(last)
    }
}

#[derive(Default)]
struct Outcome {
    refresh: bool,
    reinit: bool,
    failed: bool,
}

fn fail(out: &mut Results, idx: &[usize], e: &ProduceError) {
    for &i in idx {
        out[i] = Some(Err(e.clone()));
    }
}

/// Fail every pending batch of a partition: the head with `e`, the batches
/// behind it with the same class ("not sent"), and remember when the head
/// may have been written.
fn fail_job(j: &mut Job, e: ProduceError, out: &mut Results) {
    let Some(head) = j.chunks.pop_front() else { return };
    if head.maybe_written {
        j.guard.unresolved = true;
    }
    fail(out, &head.idx, &e);
    if j.chunks.is_empty() {
        return;
    }
    let behind = match &e {
        ProduceError::Retriable { code, name, message } => ProduceError::Retriable {
            code: *code,
            name,
            message: format!("not sent: an earlier batch to this partition failed: {message}"),
        },
        ProduceError::Fatal { code, name, message } => ProduceError::Fatal {
            code: *code,
            name,
            message: format!("not sent: an earlier batch to this partition failed: {message}"),
        },
        ProduceError::Unreachable { message } => ProduceError::Unreachable { message: message.clone() },
    };
    while let Some(c) = j.chunks.pop_front() {
        fail(out, &c.idx, &behind);
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
