//! Kafka's key hash: `org.apache.kafka.common.utils.Utils.murmur2`, and the
//! Java client's default partitioner for keyed records.

/// MurmurHash2 exactly as Kafka's Java client computes it (seed
/// `0x9747b28c`), returned as the same signed 32-bit value.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for `key`:
/// `(murmur2(key) & 0x7fffffff) % partitions`. `partitions` must be > 0.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "partition_for_key: partitions must be > 0");
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_utils_test_vectors() {
        // org.apache.kafka.common.utils.UtilsTest#testMurmur2
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
            (b"", 275_646_681),
        ];
        for (data, want) in cases {
            assert_eq!(murmur2(data), *want, "murmur2({:?})", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn librdkafka_java_vectors() {
        // librdkafka src/rdmurmur2.c unittest: values checked against the Java client.
        let cases: &[(&str, u32)] = &[
            ("kafka", 0xd067cf64),
            ("giberish123456789", 0x8f552b0c),
            ("1234", 0x9fc97b14),
            ("234", 0xe7c009ca),
            ("34", 0x873930da),
            ("4", 0x5a4b5ca1),
            ("PreAmbleWillBeRemoved,ThePrePartThatIs", 0x78424f1c),
            ("reAmbleWillBeRemoved,ThePrePartThatIs", 0x4a62b377),
            ("eAmbleWillBeRemoved,ThePrePartThatIs", 0xe0e4e09e),
            ("AmbleWillBeRemoved,ThePrePartThatIs", 0x62b8b43f),
            ("", 0x106e08d9),
        ];
        for (data, want) in cases {
            assert_eq!(murmur2(data.as_bytes()), *want as i32, "murmur2({data:?})");
        }
    }

    #[test]
    fn java_default_partitioner() {
        // kafka-python's test_murmur2_java_compatibility: output of the Java
        // client's partitioner over 1000 partitions.
        let cases: &[(&[u8], i32)] =
            &[(b"", 681), (b"a", 524), (b"ab", 434), (b"abc", 107), (b"123456789", 566), (b"\x00 ", 742)];
        for (key, want) in cases {
            assert_eq!(partition_for_key(key, 1000), *want, "key {key:?}");
        }
        // murmur2("a") = 0xa2d0b27c; & 0x7fffffff = 584102524; % 6 = 4.
        assert_eq!(partition_for_key(b"a", 6), 4);
        assert_eq!(partition_for_key(b"a", 3), 584_102_524 % 3);
        assert_eq!(partition_for_key(b"anything", 1), 0);
    }
}
