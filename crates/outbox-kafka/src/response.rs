//! The responses this client reads, decoded here rather than by
//! kafka-protocol (which still encodes the requests).
//!
//! kafka-protocol's array decoders reserve as many elements as the broker's
//! length field says before reading any: four bytes can ask for over a
//! hundred gigabytes, the allocation fails, and Rust aborts the process. In
//! the worker that is the PostgreSQL cluster restarting, so one hostile or
//! broken broker could take down every database on the server. Here every
//! length is checked against the bytes that are left before anything is
//! reserved, and what the decoded response takes (its vectors, its
//! strings) is counted against a budget of four times the response's size
//! and 64 KiB, so a response costs at most that (and is itself capped at
//! `conn::MAX_RESPONSE_BYTES`). Elements take more memory than bytes on
//! the wire (an empty topic is 3 bytes and 48 in memory), so the length
//! check alone would let one response decode to 16 times its size.
//!
//! Every field is read, but only those the producer uses are kept; tagged
//! fields (the flexible versions' extensions) are skipped by their sizes.
//! Bytes after the last field are ignored (a newer broker may add some).

use bytes::Bytes;
use std::fmt;

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, DecodeError>;

fn short(what: &str, need: usize, left: usize) -> DecodeError {
    DecodeError(format!("{what} needs {need} bytes, {left} left"))
}

/// A cursor over one response body. `flexible` selects the compact
/// encodings (varint lengths, tagged fields) of KIP-482.
pub(crate) struct Reader {
    buf: Bytes,
    flexible: bool,
    /// Bytes the decoded value may still take.
    budget: usize,
}

/// A string's smallest heap block (glibc's malloc), counted for each.
const MIN_ALLOCATION: usize = 32;

/// Bytes the decoded form of a response of `len` bytes may take, at most.
pub(crate) fn decoded_budget(len: usize) -> usize {
    len.saturating_mul(4).saturating_add(64 * 1024)
}

impl Reader {
    pub(crate) fn new(buf: Bytes, flexible: bool) -> Reader {
        let budget = decoded_budget(buf.len());
        Reader { buf, flexible, budget }
    }

    /// Count `bytes` of the decoded value against the budget.
    fn spend(&mut self, bytes: usize) -> Result<()> {
        self.budget = self
            .budget
            .checked_sub(bytes)
            .ok_or_else(|| DecodeError("the response would take more than four times its size in memory".into()))?;
        Ok(())
    }

    fn take(&mut self, what: &str, n: usize) -> Result<Bytes> {
        if n > self.buf.len() {
            return Err(short(what, n, self.buf.len()));
        }
        Ok(self.buf.split_to(n))
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.take(what, N)?;
        Ok(b[..].try_into().expect("N bytes"))
    }

    pub(crate) fn i16(&mut self) -> Result<i16> {
        self.fixed("an int16").map(i16::from_be_bytes)
    }

    pub(crate) fn i32(&mut self) -> Result<i32> {
        self.fixed("an int32").map(i32::from_be_bytes)
    }

    pub(crate) fn i64(&mut self) -> Result<i64> {
        self.fixed("an int64").map(i64::from_be_bytes)
    }

    fn skip(&mut self, what: &str, n: usize) -> Result<()> {
        self.take(what, n).map(drop)
    }

    /// An unsigned varint of at most 32 bits (five bytes).
    fn uvarint(&mut self) -> Result<u32> {
        let mut v: u32 = 0;
        for i in 0..5 {
            let [b] = self.fixed::<1>("a varint")?;
            if i == 4 && b > 0x0f {
                return Err(DecodeError("varint longer than 32 bits".into()));
            }
            v |= ((b & 0x7f) as u32) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        unreachable!("the fifth byte ends the varint or fails")
    }

    /// A length that may be null: compact (varint, 0 for null, n + 1
    /// otherwise) or classic (`classic` bytes, -1 for null).
    fn length(&mut self, classic_i32: bool) -> Result<Option<usize>> {
        if self.flexible {
            return Ok(self.uvarint()?.checked_sub(1).map(|n| n as usize));
        }
        let n = if classic_i32 { self.i32()? } else { self.i16()? as i32 };
        match n {
            -1 => Ok(None),
            n if n >= 0 => Ok(Some(n as usize)),
            n => Err(DecodeError(format!("negative length {n}"))),
        }
    }

    pub(crate) fn nullable_string(&mut self) -> Result<Option<String>> {
        let Some(n) = self.length(false)? else { return Ok(None) };
        let b = self.take("a string", n)?;
        if n > 0 {
            self.spend(n.max(MIN_ALLOCATION))?;
        }
        String::from_utf8(b.to_vec()).map(Some).map_err(|_| DecodeError("string is not UTF-8".into()))
    }

    pub(crate) fn string(&mut self) -> Result<String> {
        self.nullable_string()?.ok_or_else(|| DecodeError("null where a string is required".into()))
    }

    pub(crate) fn bytes(&mut self) -> Result<Bytes> {
        let n = self.length(true)?.ok_or_else(|| DecodeError("null where bytes are required".into()))?;
        self.take("bytes", n)
    }

    /// An array whose elements take at least `min_bytes` each. The count is
    /// checked against the bytes left before anything is reserved; a null
    /// array reads as empty.
    pub(crate) fn array<T>(
        &mut self,
        min_bytes: usize,
        mut element: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<Vec<T>> {
        let Some(n) = self.length(true)? else { return Ok(Vec::new()) };
        let left = self.buf.len();
        if n.saturating_mul(min_bytes.max(1)) > left {
            return Err(DecodeError(format!("array of {n} elements in the {left} bytes left")));
        }
        self.spend(n.saturating_mul(std::mem::size_of::<T>()))?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(element(self)?);
        }
        Ok(out)
    }

    /// An array of int32s, read past.
    pub(crate) fn skip_i32_array(&mut self) -> Result<()> {
        self.array(4, |r| r.skip("an int32", 4)).map(drop)
    }

    /// The tagged fields of a flexible version, read past (none otherwise).
    pub(crate) fn tagged_fields(&mut self) -> Result<()> {
        if !self.flexible {
            return Ok(());
        }
        let count = self.uvarint()?;
        for _ in 0..count {
            let _tag = self.uvarint()?;
            let size = self.uvarint()? as usize;
            self.skip("a tagged field", size)?;
        }
        Ok(())
    }
}

/// A response to one of the requests this client sends.
pub(crate) trait Response: Sized {
    /// The first version that uses the compact encodings.
    const FLEXIBLE_FROM: i16;
    fn read(r: &mut Reader, version: i16) -> Result<Self>;

    /// The response header's version: 1 (with tagged fields) for flexible
    /// versions, 0 before. ApiVersions overrides: its header is always 0,
    /// so that any client can read the versions a broker offers.
    fn header_version(version: i16) -> i16 {
        i16::from(version >= Self::FLEXIBLE_FROM)
    }

    fn decode(body: Bytes, version: i16) -> Result<Self> {
        Self::read(&mut Reader::new(body, version >= Self::FLEXIBLE_FROM), version)
    }
}

/// The response header: the correlation id, then (version 1) tagged fields.
pub(crate) fn read_header(body: &mut Bytes, version: i16) -> Result<i32> {
    let mut r = Reader::new(std::mem::take(body), version >= 1);
    let correlation = r.i32()?;
    r.tagged_fields()?;
    *body = r.buf;
    Ok(correlation)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiVersions {
    pub error_code: i16,
    /// (API key, lowest version, highest version)
    pub api_keys: Vec<(i16, i16, i16)>,
}

impl Response for ApiVersions {
    const FLEXIBLE_FROM: i16 = 3;
    fn header_version(_: i16) -> i16 {
        0
    }
    fn read(r: &mut Reader, version: i16) -> Result<Self> {
        let error_code = r.i16()?;
        let api_keys = r.array(6, |r| {
            let key = (r.i16()?, r.i16()?, r.i16()?);
            r.tagged_fields()?;
            Ok(key)
        })?;
        if version >= 1 {
            let _throttle_time_ms = r.i32()?;
        }
        r.tagged_fields()?; // features
        Ok(ApiVersions { error_code, api_keys })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SaslHandshake {
    pub error_code: i16,
    pub mechanisms: Vec<String>,
}

impl Response for SaslHandshake {
    const FLEXIBLE_FROM: i16 = i16::MAX;
    fn read(r: &mut Reader, _version: i16) -> Result<Self> {
        let error_code = r.i16()?;
        let mechanisms = r.array(2, Reader::string)?;
        Ok(SaslHandshake { error_code, mechanisms })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SaslAuthenticate {
    pub error_code: i16,
    pub error_message: Option<String>,
    pub auth_bytes: Bytes,
}

impl Response for SaslAuthenticate {
    const FLEXIBLE_FROM: i16 = 2;
    fn read(r: &mut Reader, version: i16) -> Result<Self> {
        let resp =
            SaslAuthenticate { error_code: r.i16()?, error_message: r.nullable_string()?, auth_bytes: r.bytes()? };
        if version >= 1 {
            let _session_lifetime_ms = r.i64()?;
        }
        r.tagged_fields()?;
        Ok(resp)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InitProducerId {
    pub error_code: i16,
    pub producer_id: i64,
    pub producer_epoch: i16,
}

impl Response for InitProducerId {
    const FLEXIBLE_FROM: i16 = 2;
    fn read(r: &mut Reader, _version: i16) -> Result<Self> {
        let _throttle_time_ms = r.i32()?;
        let resp = InitProducerId { error_code: r.i16()?, producer_id: r.i64()?, producer_epoch: r.i16()? };
        r.tagged_fields()?;
        Ok(resp)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Metadata {
    pub brokers: Vec<MetadataBroker>,
    pub topics: Vec<MetadataTopic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetadataBroker {
    pub node_id: i32,
    pub host: String,
    pub port: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetadataTopic {
    pub error_code: i16,
    /// Null from version 12 when the request named topics by id.
    pub name: Option<String>,
    pub partitions: Vec<MetadataPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetadataPartition {
    pub error_code: i16,
    pub partition_index: i32,
    pub leader_id: i32,
}

impl Response for Metadata {
    const FLEXIBLE_FROM: i16 = 9;
    fn read(r: &mut Reader, v: i16) -> Result<Self> {
        if v >= 3 {
            let _throttle_time_ms = r.i32()?;
        }
        let brokers = r.array(9, |r| {
            let node_id = r.i32()?;
            let host = r.string()?;
            let port = r.i32()?;
            if v >= 1 {
                let _rack = r.nullable_string()?;
            }
            r.tagged_fields()?;
            Ok(MetadataBroker { node_id, host, port })
        })?;
        if v >= 2 {
            let _cluster_id = r.nullable_string()?;
        }
        if v >= 1 {
            let _controller_id = r.i32()?;
        }
        let topics = r.array(4, |r| {
            let error_code = r.i16()?;
            let name = if v >= 12 { r.nullable_string()? } else { Some(r.string()?) };
            if v >= 10 {
                r.skip("a topic id", 16)?;
            }
            if v >= 1 {
                let _is_internal = r.fixed::<1>("a boolean")?;
            }
            let partitions = r.array(10, |r| {
                let error_code = r.i16()?;
                let partition_index = r.i32()?;
                let leader_id = r.i32()?;
                if v >= 7 {
                    let _leader_epoch = r.i32()?;
                }
                r.skip_i32_array()?; // replicas
                r.skip_i32_array()?; // in-sync replicas
                if v >= 5 {
                    r.skip_i32_array()?; // offline replicas
                }
                r.tagged_fields()?;
                Ok(MetadataPartition { error_code, partition_index, leader_id })
            })?;
            if v >= 8 {
                let _topic_authorized_operations = r.i32()?;
            }
            r.tagged_fields()?;
            Ok(MetadataTopic { error_code, name, partitions })
        })?;
        if (8..=10).contains(&v) {
            let _cluster_authorized_operations = r.i32()?;
        }
        r.tagged_fields()?;
        Ok(Metadata { brokers, topics })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Produce {
    pub responses: Vec<ProduceTopic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProduceTopic {
    pub name: String,
    pub partition_responses: Vec<ProducePartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProducePartition {
    pub index: i32,
    pub error_code: i16,
    pub base_offset: i64,
    /// (batch index, message) per record the broker refused (version 8+).
    pub record_errors: Vec<(i32, Option<String>)>,
    pub error_message: Option<String>,
}

impl Response for Produce {
    const FLEXIBLE_FROM: i16 = 9;
    fn read(r: &mut Reader, v: i16) -> Result<Self> {
        // Versions 3 to 12 (13 names topics by id).
        let responses = r.array(3, |r| {
            let name = r.string()?;
            let partition_responses = r.array(14, |r| {
                let index = r.i32()?;
                let error_code = r.i16()?;
                let base_offset = r.i64()?;
                let _log_append_time_ms = r.i64()?;
                if v >= 5 {
                    let _log_start_offset = r.i64()?;
                }
                let (mut record_errors, mut error_message) = (Vec::new(), None);
                if v >= 8 {
                    record_errors = r.array(5, |r| {
                        let e = (r.i32()?, r.nullable_string()?);
                        r.tagged_fields()?;
                        Ok(e)
                    })?;
                    error_message = r.nullable_string()?;
                }
                r.tagged_fields()?;
                Ok(ProducePartition { index, error_code, base_offset, record_errors, error_message })
            })?;
            r.tagged_fields()?;
            Ok(ProduceTopic { name, partition_responses })
        })?;
        let _throttle_time_ms = r.i32()?;
        r.tagged_fields()?; // node endpoints
        Ok(Produce { responses })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::messages as kp;
    use kafka_protocol::protocol::{Encodable, StrBytes};

    fn encode(msg: &impl Encodable, version: i16) -> Bytes {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf, version).unwrap();
        buf.freeze()
    }

    fn s(v: &str) -> StrBytes {
        StrBytes::from_string(v.to_string())
    }

    /// What kafka-protocol encodes, at every version the client asks for,
    /// reads back the same here, tagged fields included.
    #[test]
    fn reads_what_kafka_protocol_writes_at_every_version() {
        use kafka_protocol::messages::api_versions_response::{ApiVersion, SupportedFeatureKey};
        use kafka_protocol::messages::metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        };
        use kafka_protocol::messages::produce_response::{
            BatchIndexAndErrorMessage, LeaderIdAndEpoch, NodeEndpoint, PartitionProduceResponse, TopicProduceResponse,
        };
        for v in [0, 3] {
            let resp = kp::ApiVersionsResponse::default()
                .with_error_code(35)
                .with_api_keys(vec![ApiVersion::default().with_api_key(3).with_min_version(1).with_max_version(12)])
                .with_throttle_time_ms(7)
                .with_supported_features(vec![SupportedFeatureKey::default().with_name(s("metadata.version"))]);
            let got = ApiVersions::decode(encode(&resp, v), v).unwrap();
            assert_eq!(got, ApiVersions { error_code: 35, api_keys: vec![(3, 1, 12)] }, "ApiVersions v{v}");
        }
        let resp = kp::SaslHandshakeResponse::default().with_error_code(33).with_mechanisms(vec![s("PLAIN"), s("X")]);
        let got = SaslHandshake::decode(encode(&resp, 1), 1).unwrap();
        assert_eq!(got.mechanisms, ["PLAIN", "X"]);
        for v in 0..=2 {
            let resp = kp::SaslAuthenticateResponse::default()
                .with_error_code(58)
                .with_error_message(Some(s("no")))
                .with_auth_bytes(Bytes::from_static(b"r=abc"))
                .with_session_lifetime_ms(9);
            let got = SaslAuthenticate::decode(encode(&resp, v), v).unwrap();
            assert_eq!(
                got,
                SaslAuthenticate {
                    error_code: 58,
                    error_message: Some("no".into()),
                    auth_bytes: Bytes::from_static(b"r=abc")
                },
                "SaslAuthenticate v{v}"
            );
        }
        for v in 0..=4 {
            let resp = kp::InitProducerIdResponse::default()
                .with_throttle_time_ms(1)
                .with_error_code(0)
                .with_producer_id(kp::ProducerId(4242))
                .with_producer_epoch(3);
            let got = InitProducerId::decode(encode(&resp, v), v).unwrap();
            assert_eq!(got, InitProducerId { error_code: 0, producer_id: 4242, producer_epoch: 3 }, "v{v}");
        }
        for v in 4..=12 {
            let part = |i: i32| {
                MetadataResponsePartition::default()
                    .with_error_code(if i == 1 { 9 } else { 0 })
                    .with_partition_index(i)
                    .with_leader_id(kp::BrokerId(10 + i))
                    .with_leader_epoch(if v >= 7 { 5 } else { -1 })
                    .with_replica_nodes(vec![kp::BrokerId(1), kp::BrokerId(2)])
                    .with_isr_nodes(vec![kp::BrokerId(1)])
                    .with_offline_replicas(vec![kp::BrokerId(2)])
            };
            let resp = kp::MetadataResponse::default()
                .with_throttle_time_ms(1)
                .with_brokers(vec![
                    MetadataResponseBroker::default()
                        .with_node_id(kp::BrokerId(1))
                        .with_host(s("k1"))
                        .with_port(9092)
                        .with_rack(Some(s("r1"))),
                    MetadataResponseBroker::default().with_node_id(kp::BrokerId(2)).with_host(s("::1")).with_port(9093),
                ])
                .with_cluster_id(Some(s("c")))
                .with_controller_id(kp::BrokerId(1))
                .with_topics(vec![
                    MetadataResponseTopic::default()
                        .with_error_code(3)
                        .with_name(Some(kp::TopicName(s("gone"))))
                        .with_is_internal(true),
                    MetadataResponseTopic::default()
                        .with_name(Some(kp::TopicName(s("t"))))
                        .with_partitions(vec![part(0), part(1)])
                        .with_topic_authorized_operations(if v >= 8 { 5 } else { i32::MIN }),
                ])
                .with_cluster_authorized_operations(if (8..=10).contains(&v) { 1 } else { i32::MIN });
            let got = Metadata::decode(encode(&resp, v), v).unwrap();
            let want = Metadata {
                brokers: vec![
                    MetadataBroker { node_id: 1, host: "k1".into(), port: 9092 },
                    MetadataBroker { node_id: 2, host: "::1".into(), port: 9093 },
                ],
                topics: vec![
                    MetadataTopic { error_code: 3, name: Some("gone".into()), partitions: vec![] },
                    MetadataTopic {
                        error_code: 0,
                        name: Some("t".into()),
                        partitions: vec![
                            MetadataPartition { error_code: 0, partition_index: 0, leader_id: 10 },
                            MetadataPartition { error_code: 9, partition_index: 1, leader_id: 11 },
                        ],
                    },
                ],
            };
            assert_eq!(got, want, "Metadata v{v}");
        }
        for v in 3..=11 {
            let part = PartitionProduceResponse::default()
                .with_index(2)
                .with_error_code(if v >= 8 { 87 } else { 0 })
                .with_base_offset(100)
                .with_log_append_time_ms(-1)
                .with_log_start_offset(4)
                .with_record_errors(if v >= 8 {
                    vec![BatchIndexAndErrorMessage::default()
                        .with_batch_index(1)
                        .with_batch_index_error_message(Some(s("bad record")))]
                } else {
                    vec![]
                })
                .with_error_message(if v >= 8 { Some(s("refused")) } else { None })
                .with_current_leader(LeaderIdAndEpoch::default().with_leader_id(kp::BrokerId(3)).with_leader_epoch(2));
            let resp = kp::ProduceResponse::default()
                .with_responses(vec![TopicProduceResponse::default()
                    .with_name(kp::TopicName(s("t")))
                    .with_partition_responses(vec![part])])
                .with_throttle_time_ms(3)
                .with_node_endpoints(if v >= 10 {
                    vec![NodeEndpoint::default().with_node_id(kp::BrokerId(3)).with_host(s("k3")).with_port(1)]
                } else {
                    vec![]
                });
            let got = Produce::decode(encode(&resp, v), v).unwrap();
            let (record_errors, error_message) = if v >= 8 {
                (vec![(1, Some("bad record".to_string()))], Some("refused".to_string()))
            } else {
                (vec![], None)
            };
            let want = Produce {
                responses: vec![ProduceTopic {
                    name: "t".into(),
                    partition_responses: vec![ProducePartition {
                        index: 2,
                        error_code: if v >= 8 { 87 } else { 0 },
                        base_offset: 100,
                        record_errors,
                        error_message,
                    }],
                }],
            };
            assert_eq!(got, want, "Produce v{v}");
        }
    }

    /// The budget leaves room for what real clusters answer: a thousand
    /// brokers with short names.
    #[test]
    fn a_large_cluster_fits_the_budget() {
        use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
        let brokers: Vec<_> = (0..1000)
            .map(|i| MetadataResponseBroker::default().with_node_id(kp::BrokerId(i)).with_host(s("k1")).with_port(9092))
            .collect();
        for v in [4, 12] {
            let resp = kp::MetadataResponse::default().with_brokers(brokers.clone());
            assert_eq!(Metadata::decode(encode(&resp, v), v).unwrap().brokers.len(), 1000, "v{v}");
        }
    }

    #[test]
    fn headers_with_and_without_tagged_fields() {
        let mut b = Bytes::from_static(&[0, 0, 0, 9, 1, 5, 2, 0xaa, 0xbb, 0x77]);
        assert_eq!(read_header(&mut b, 1), Ok(9));
        assert_eq!(&b[..], [0x77]);
        let mut b = Bytes::from_static(&[0, 0, 0, 9, 1]);
        assert_eq!(read_header(&mut b, 0), Ok(9));
        assert_eq!(&b[..], [1]);
    }

    /// Lengths are checked before anything is reserved or read, and every
    /// bad field is an error, never a panic.
    #[test]
    fn lengths_beyond_the_bytes_left_are_refused() {
        let cases: &[(&[u8], bool)] = &[
            (&[0x7f, 0xff, 0xff, 0xff], false),             // 2^31 - 1 elements
            (&[0xff, 0xff, 0xff, 0xff, 0x0f], true),        // 2^32 - 2 elements
            (&[0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 2], false), // 3 int32s, 2 there
            (&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01], true),  // a varint of 6 bytes
            (&[0xff, 0xff, 0xff, 0xfe], false),             // -2 elements
        ];
        for (bytes, flexible) in cases {
            let mut r = Reader::new(Bytes::from_static(bytes), *flexible);
            let e = r.array(4, |r| r.i32()).unwrap_err();
            assert!(!e.0.is_empty(), "{bytes:?}");
        }
        let e = Reader::new(Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff]), false).array(1, |r| r.i16()).unwrap_err();
        assert_eq!(e.0, "array of 2147483647 elements in the 0 bytes left");
        // Strings, bytes and tagged fields are bounded by what is left too.
        assert!(Reader::new(Bytes::from_static(&[0x7f, 0xff, b'a']), false).string().is_err());
        assert!(Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f]), true).bytes().is_err());
        assert!(Reader::new(Bytes::from_static(&[1, 0, 0xff, 0xff, 0x03]), true).tagged_fields().is_err());
        assert!(Reader::new(Bytes::from_static(&[0, 2, 0xff, 0xfe]), false).string().is_err());
        // Elements that are small on the wire and large in memory: 8 MB of
        // empty topics (3 bytes each, 48 in memory) would decode to 134 MB.
        let n: u32 = (8 << 20) / 3;
        let mut body = vec![];
        let mut v = n + 1;
        while v >= 0x80 {
            body.push((v as u8) | 0x80);
            v >>= 7;
        }
        body.push(v as u8);
        for _ in 0..n {
            body.extend_from_slice(&[1, 1, 0]); // name "", no partitions, no tagged fields
        }
        body.extend_from_slice(&[0, 0, 0, 0, 0]); // throttle time, no tagged fields
        let e = Produce::decode(Bytes::from(body), 9).unwrap_err();
        assert!(e.0.contains("four times its size"), "{e}");
        // Every response, cut anywhere, is an error rather than a panic.
        let full = encode(
            &kp::MetadataResponse::default().with_brokers(vec![
                kafka_protocol::messages::metadata_response::MetadataResponseBroker::default().with_host(s("h")),
            ]),
            12,
        );
        for cut in 0..full.len() {
            assert!(Metadata::decode(full.slice(..cut), 12).is_err(), "cut at {cut}");
        }
    }
}
