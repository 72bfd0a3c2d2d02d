//! Record batch (magic v2) encoding, as the Java client's MemoryRecordsBuilder
//! writes it for an idempotent, non-transactional producer.
//!
//! Layout (big endian):
//! ```text
//!  0 baseOffset i64 | 8 batchLength i32 | 12 partitionLeaderEpoch i32 | 16 magic i8
//! 17 crc u32 (CRC-32C of bytes 21..) | 21 attributes i16 | 23 lastOffsetDelta i32
//! 27 baseTimestamp i64 | 35 maxTimestamp i64 | 43 producerId i64 | 51 producerEpoch i16
//! 53 baseSequence i32 | 57 recordCount i32 | 61 records (possibly compressed)
//! ```

use crate::compression::{compress, Compression};
use crate::Record;

pub(crate) const BATCH_OVERHEAD: usize = 61;
const CRC_START: usize = 21;
const PRODUCER_ID_AT: usize = 43;
const EPOCH_AT: usize = 51;
const SEQUENCE_AT: usize = 53;

fn put_uvarint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

pub(crate) fn put_varint(buf: &mut Vec<u8>, v: i32) {
    put_uvarint(buf, ((v << 1) ^ (v >> 31)) as u32 as u64);
}

pub(crate) fn put_varlong(buf: &mut Vec<u8>, v: i64) {
    put_uvarint(buf, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_bytes(buf: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => put_varint(buf, -1),
        Some(b) => {
            put_varint(buf, b.len() as i32);
            buf.extend_from_slice(b);
        }
    }
}

/// An upper bound of a record's encoded size (uncompressed), used to split
/// batches and to refuse a record larger than a request may be.
pub(crate) fn record_size_bound(r: &Record) -> usize {
    // length (5) + attributes (1) + timestampDelta (10) + offsetDelta (5)
    // + key (5 + n) + value (5 + n) + header count (5) + headers (10 + k + v each)
    31 + r.key.as_ref().map_or(0, Vec::len)
        + r.value.len()
        + r.headers.iter().map(|(k, v)| 10 + k.len() + v.len()).sum::<usize>()
}

/// Producer identity and position stamped on a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

/// Encode `records` as one record batch with base offset 0.
/// A record with a negative timestamp gets `now_ms`.
pub(crate) fn encode_batch<'a>(
    records: impl Iterator<Item = &'a Record> + Clone,
    compression: Compression,
    stamp: Stamp,
    now_ms: i64,
) -> Result<Vec<u8>, String> {
    let ts = |r: &Record| if r.timestamp_ms < 0 { now_ms } else { r.timestamp_ms };
    let (mut count, mut min_ts, mut max_ts, mut bound) = (0usize, i64::MAX, i64::MIN, 0usize);
    for r in records.clone() {
        count += 1;
        min_ts = min_ts.min(ts(r));
        max_ts = max_ts.max(ts(r));
        bound += record_size_bound(r);
    }
    if count == 0 {
        return Err("empty batch".into());
    }
    if count > i32::MAX as usize {
        return Err("too many records for one batch".into());
    }

    let mut plain = Vec::with_capacity(bound);
    let mut rec = Vec::with_capacity(256);
    for (i, r) in records.enumerate() {
        rec.clear();
        rec.push(0); // attributes (unused)
        put_varlong(&mut rec, ts(r) - min_ts);
        put_varint(&mut rec, i as i32);
        put_bytes(&mut rec, r.key.as_deref());
        put_bytes(&mut rec, Some(&r.value));
        put_varint(&mut rec, r.headers.len() as i32);
        for (k, v) in &r.headers {
            put_bytes(&mut rec, Some(k.as_bytes()));
            put_bytes(&mut rec, Some(v));
        }
        put_varint(&mut plain, rec.len() as i32);
        plain.extend_from_slice(&rec);
    }
    let body = match compression {
        Compression::None => plain,
        c => compress(c, &plain)?,
    };

    let mut b = Vec::with_capacity(BATCH_OVERHEAD + body.len());
    b.extend_from_slice(&0i64.to_be_bytes()); // baseOffset
    b.extend_from_slice(&((BATCH_OVERHEAD - 12 + body.len()) as i32).to_be_bytes()); // batchLength
    b.extend_from_slice(&(-1i32).to_be_bytes()); // partitionLeaderEpoch
    b.push(2); // magic
    b.extend_from_slice(&[0; 4]); // crc, below
                                  // attributes: codec in bits 0-2; CreateTime (bit 3 clear); not transactional, not control.
    b.extend_from_slice(&compression.attribute().to_be_bytes());
    b.extend_from_slice(&((count - 1) as i32).to_be_bytes()); // lastOffsetDelta
    b.extend_from_slice(&min_ts.to_be_bytes()); // baseTimestamp
    b.extend_from_slice(&max_ts.to_be_bytes()); // maxTimestamp
    b.extend_from_slice(&stamp.producer_id.to_be_bytes());
    b.extend_from_slice(&stamp.producer_epoch.to_be_bytes());
    b.extend_from_slice(&stamp.base_sequence.to_be_bytes());
    b.extend_from_slice(&(count as i32).to_be_bytes());
    debug_assert_eq!(b.len(), BATCH_OVERHEAD);
    b.extend_from_slice(&body);
    set_crc(&mut b);
    Ok(b)
}

fn set_crc(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[CRC_START..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
}

/// Re-stamp an encoded batch with another producer id/epoch/sequence
/// (after the producer re-initialised), fixing its CRC.
pub(crate) fn restamp(b: &mut [u8], stamp: Stamp) {
    b[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&stamp.producer_id.to_be_bytes());
    b[EPOCH_AT..EPOCH_AT + 2].copy_from_slice(&stamp.producer_epoch.to_be_bytes());
    b[SEQUENCE_AT..SEQUENCE_AT + 4].copy_from_slice(&stamp.base_sequence.to_be_bytes());
    set_crc(b);
}

/// Kafka's sequence arithmetic: sequences wrap from i32::MAX to 0.
pub(crate) fn next_sequence(seq: i32, count: usize) -> i32 {
    ((seq as i64 + count as i64) % (i32::MAX as i64 + 1)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::decompress;
    use bytes::Bytes;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{self, RecordBatchDecoder};

    fn get_varlong(b: &mut &[u8]) -> i64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[0];
            *b = &b[1..];
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return ((v >> 1) as i64) ^ -((v & 1) as i64);
            }
            shift += 7;
        }
    }

    fn get_bytes(b: &mut &[u8]) -> Option<Vec<u8>> {
        let n = get_varlong(b);
        if n < 0 {
            return None;
        }
        let (v, rest) = b.split_at(n as usize);
        *b = rest;
        Some(v.to_vec())
    }

    type Plain = (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>, i64, i64);

    /// An independent reader of uncompressed records: key, value, headers, timestamp and offset deltas.
    fn parse_records(mut b: &[u8]) -> Vec<Plain> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let len = get_varlong(&mut b) as usize;
            let (mut r, rest) = b.split_at(len);
            b = rest;
            assert_eq!(r[0], 0, "record attributes");
            r = &r[1..];
            let ts = get_varlong(&mut r);
            let off = get_varlong(&mut r);
            let key = get_bytes(&mut r);
            let value = get_bytes(&mut r).unwrap();
            let n = get_varlong(&mut r);
            let headers = (0..n)
                .map(|_| (String::from_utf8(get_bytes(&mut r).unwrap()).unwrap(), get_bytes(&mut r).unwrap()))
                .collect();
            assert!(r.is_empty());
            out.push((key, value, headers, ts, off));
        }
        out
    }

    fn rec(key: Option<&str>, value: &str, headers: &[(&str, &str)], ts: i64) -> Record {
        Record {
            key: key.map(|k| k.as_bytes().to_vec()),
            value: value.as_bytes().to_vec(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
            timestamp_ms: ts,
        }
    }

    fn codec_of(c: records::Compression) -> Compression {
        match c {
            records::Compression::None => Compression::None,
            records::Compression::Gzip => Compression::Gzip,
            records::Compression::Snappy => Compression::Snappy,
            records::Compression::Lz4 => Compression::Lz4,
            records::Compression::Zstd => Compression::Zstd,
        }
    }

    fn decode(b: &[u8]) -> records::RecordSet {
        let mut buf = Bytes::copy_from_slice(b);
        RecordBatchDecoder::decode_with_custom_compression(
            &mut buf,
            Some(|data: &mut Bytes, c: records::Compression| {
                decompress(codec_of(c), data).map(Bytes::from).map_err(|e| anyhow::anyhow!(e))
            }),
        )
        .unwrap()
    }

    #[test]
    fn varints_match_kafka() {
        // ByteUtils.writeVarint / writeVarlong (zig-zag, LEB128).
        let cases: &[(i32, &[u8])] = &[
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (63, &[0x7e]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (300, &[0xd8, 0x04]),
            (i32::MAX, &[0xfe, 0xff, 0xff, 0xff, 0x0f]),
            (i32::MIN, &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        ];
        for (v, want) in cases {
            let mut b = Vec::new();
            put_varint(&mut b, *v);
            assert_eq!(&b, want, "varint {v}");
        }
        let mut b = Vec::new();
        put_varlong(&mut b, i64::MIN);
        assert_eq!(b, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    }

    #[test]
    fn batch_header_fields_and_crc() {
        let records = [
            rec(Some("k1"), "v1", &[("h", "1"), ("h", "2")], 1_700_000_000_000),
            rec(None, "v2", &[], 1_700_000_000_005),
            rec(Some("k3"), "", &[("empty", "")], 1_699_999_999_990),
        ];
        let stamp = Stamp { producer_id: 4242, producer_epoch: 7, base_sequence: 1000 };
        let b = encode_batch(records.iter(), Compression::None, stamp, 0).unwrap();
        assert_eq!(i64::from_be_bytes(b[0..8].try_into().unwrap()), 0);
        assert_eq!(i32::from_be_bytes(b[8..12].try_into().unwrap()) as usize, b.len() - 12);
        assert_eq!(b[16], 2);
        assert_eq!(u32::from_be_bytes(b[17..21].try_into().unwrap()), crc32c::crc32c(&b[21..]));
        let attributes = i16::from_be_bytes(b[21..23].try_into().unwrap());
        assert_eq!(attributes, 0, "no codec, CreateTime, not transactional, not control");
        assert_eq!(i32::from_be_bytes(b[23..27].try_into().unwrap()), 2);
        assert_eq!(i64::from_be_bytes(b[27..35].try_into().unwrap()), 1_699_999_999_990);
        assert_eq!(i64::from_be_bytes(b[35..43].try_into().unwrap()), 1_700_000_000_005);
        assert_eq!(i64::from_be_bytes(b[43..51].try_into().unwrap()), 4242);
        assert_eq!(i16::from_be_bytes(b[51..53].try_into().unwrap()), 7);
        assert_eq!(i32::from_be_bytes(b[53..57].try_into().unwrap()), 1000);
        assert_eq!(i32::from_be_bytes(b[57..61].try_into().unwrap()), 3);

        // kafka-protocol's decoder reads it back (it checks the CRC).
        let set = decode(&b);
        assert_eq!(set.records.len(), 3);
        for (i, (r, want)) in set.records.iter().zip(&records).enumerate() {
            assert_eq!(r.offset, i as i64);
            assert_eq!(r.sequence, 1000 + i as i32);
            assert_eq!(r.producer_id, 4242);
            assert_eq!(r.producer_epoch, 7);
            assert!(!r.transactional && !r.control);
            assert_eq!(r.timestamp_type, records::TimestampType::Creation);
            assert_eq!(r.timestamp, want.timestamp_ms);
            assert_eq!(r.key.as_deref(), want.key.as_deref());
            assert_eq!(r.value.as_deref(), Some(&want.value[..]));
        }
        // kafka-protocol keeps headers in a map (the last of a repeated name).
        let h =
            |i: usize, k: &'static str| set.records[i].headers.get(&StrBytes::from_static_str(k)).cloned().flatten();
        assert_eq!(h(0, "h").as_deref(), Some(&b"2"[..]));
        assert_eq!(h(2, "empty").as_deref(), Some(&b""[..]));
        // On the wire both headers are there, in order.
        let plain = parse_records(&b[BATCH_OVERHEAD..]);
        assert_eq!(plain[0].2, vec![("h".to_string(), b"1".to_vec()), ("h".to_string(), b"2".to_vec())]);
        assert_eq!(plain.iter().map(|r| r.3).collect::<Vec<_>>(), vec![10, 15, 0], "timestamp deltas");
        let infos = RecordBatchDecoder::decode_batch_info(&mut Bytes::copy_from_slice(&b)).unwrap();
        assert_eq!(infos[0].base_sequence, 1000);
        assert_eq!(infos[0].record_count, 3);
    }

    #[test]
    fn every_codec_decodes() {
        let records: Vec<Record> = (0..2000)
            .map(|i| {
                rec(
                    Some(&format!("key-{}", i % 7)),
                    &format!("value {i} {}", "x".repeat(i % 50)),
                    &[("n", "1")],
                    i as i64,
                )
            })
            .collect();
        for codec in [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
            if cfg!(not(feature = "zstd")) && codec == Compression::Zstd {
                continue;
            }
            let stamp = Stamp { producer_id: 1, producer_epoch: 0, base_sequence: 0 };
            let b = encode_batch(records.iter(), codec, stamp, 0).unwrap();
            assert_eq!(i16::from_be_bytes(b[21..23].try_into().unwrap()) & 7, codec.attribute(), "{codec:?}");
            let set = decode(&b);
            assert_eq!(codec_of(set.compression), codec);
            assert_eq!(set.records.len(), records.len());
            for (r, want) in set.records.iter().zip(&records) {
                assert_eq!(r.value.as_deref(), Some(&want.value[..]));
                assert_eq!(r.key.as_deref(), want.key.as_deref());
                assert_eq!(r.timestamp, want.timestamp_ms);
            }
        }
    }

    #[test]
    fn restamp_changes_identity_and_crc() {
        let records = [rec(Some("k"), "v", &[], 5)];
        let mut b = encode_batch(
            records.iter(),
            Compression::Lz4,
            Stamp { producer_id: 1, producer_epoch: 0, base_sequence: 9 },
            0,
        )
        .unwrap();
        let stamp = Stamp { producer_id: 77, producer_epoch: 3, base_sequence: 0 };
        restamp(&mut b, stamp);
        let want = encode_batch(records.iter(), Compression::Lz4, stamp, 0).unwrap();
        assert_eq!(b, want);
        let set = decode(&b);
        assert_eq!((set.records[0].producer_id, set.records[0].producer_epoch, set.records[0].sequence), (77, 3, 0));
    }

    #[test]
    fn size_bound_is_an_upper_bound() {
        let r = rec(Some("key"), &"v".repeat(1000), &[("a", "b"), ("cc", "dd")], 123);
        let b = encode_batch(
            std::iter::once(&r),
            Compression::None,
            Stamp { producer_id: -1, producer_epoch: -1, base_sequence: -1 },
            0,
        )
        .unwrap();
        assert!(b.len() - BATCH_OVERHEAD <= record_size_bound(&r));
    }

    #[test]
    fn negative_timestamp_means_now() {
        let r = rec(None, "v", &[], -1);
        let b = encode_batch(
            std::iter::once(&r),
            Compression::None,
            Stamp { producer_id: -1, producer_epoch: -1, base_sequence: -1 },
            99,
        )
        .unwrap();
        assert_eq!(decode(&b).records[0].timestamp, 99);
    }

    #[test]
    fn sequence_wraps() {
        assert_eq!(next_sequence(0, 5), 5);
        assert_eq!(next_sequence(i32::MAX, 1), 0);
        assert_eq!(next_sequence(i32::MAX - 1, 5), 3);
    }
}
