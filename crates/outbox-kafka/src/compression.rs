//! Record-batch compression in the formats Kafka's Java client writes.

use std::io::Write;

/// The codec for record batches (the low three bits of a batch's attributes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    #[default]
    None,
    /// gzip (RFC 1952), as java.util.zip.GZIPOutputStream writes it.
    Gzip,
    /// Snappy in xerial/snappy-java's stream framing (what the Java client
    /// writes; brokers and librdkafka read it).
    Snappy,
    /// LZ4 frame format, independent 64 KiB blocks, no checksums but the
    /// header's (what KafkaLZ4BlockInputStream reads).
    Lz4,
    /// Zstandard frames (Produce v7+, Kafka 2.1+). Needs the `zstd` feature.
    Zstd,
}

impl Compression {
    pub(crate) fn attribute(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }
}

/// snappy-java's stream header: magic, version 1, compatible version 1.
const XERIAL_HEADER: &[u8; 16] = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01";
/// snappy-java's default block size.
const XERIAL_BLOCK: usize = 32 * 1024;

/// Compress `data` (a batch's concatenated records) with `codec`.
pub(crate) fn compress(codec: Compression, data: &[u8]) -> Result<Vec<u8>, String> {
    match codec {
        Compression::None => Ok(data.to_vec()),
        Compression::Gzip => {
            let mut enc =
                flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 2 + 64), flate2::Compression::default());
            enc.write_all(data).map_err(|e| format!("gzip: {e}"))?;
            enc.finish().map_err(|e| format!("gzip: {e}"))
        }
        Compression::Snappy => {
            let mut out = Vec::with_capacity(XERIAL_HEADER.len() + snap::raw::max_compress_len(data.len()) + 64);
            out.extend_from_slice(XERIAL_HEADER);
            let mut enc = snap::raw::Encoder::new();
            let mut block = vec![0u8; snap::raw::max_compress_len(XERIAL_BLOCK)];
            for chunk in data.chunks(XERIAL_BLOCK) {
                let n = enc.compress(chunk, &mut block).map_err(|e| format!("snappy: {e}"))?;
                out.extend_from_slice(&(n as u32).to_be_bytes());
                out.extend_from_slice(&block[..n]);
            }
            Ok(out)
        }
        Compression::Lz4 => {
            let info = lz4_flex::frame::FrameInfo::new()
                .block_size(lz4_flex::frame::BlockSize::Max64KB)
                .block_mode(lz4_flex::frame::BlockMode::Independent)
                .block_checksums(false)
                .content_checksum(false);
            let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::with_capacity(data.len() / 2 + 64));
            enc.write_all(data).map_err(|e| format!("lz4: {e}"))?;
            enc.finish().map_err(|e| format!("lz4: {e}"))
        }
        Compression::Zstd => zstd_compress(data),
    }
}

#[cfg(feature = "zstd")]
fn zstd_compress(data: &[u8]) -> Result<Vec<u8>, String> {
    // Level 3: zstd's and the Java client's default.
    zstd::bulk::compress(data, 3).map_err(|e| format!("zstd: {e}"))
}

#[cfg(not(feature = "zstd"))]
fn zstd_compress(_data: &[u8]) -> Result<Vec<u8>, String> {
    Err("zstd support is not compiled in (feature `zstd`)".into())
}

/// Inverse of [`compress`], for tests.
#[cfg(test)]
pub(crate) fn decompress(codec: Compression, data: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    match codec {
        Compression::None => Ok(data.to_vec()),
        Compression::Gzip => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(data).read_to_end(&mut out).map_err(|e| e.to_string())?;
            Ok(out)
        }
        Compression::Snappy => {
            let mut rest = data.strip_prefix(XERIAL_HEADER.as_slice()).ok_or("no xerial header")?;
            let mut out = Vec::new();
            while !rest.is_empty() {
                let n = u32::from_be_bytes(rest.get(..4).ok_or("short")?.try_into().unwrap()) as usize;
                let block = rest.get(4..4 + n).ok_or("short block")?;
                out.extend(snap::raw::Decoder::new().decompress_vec(block).map_err(|e| e.to_string())?);
                rest = &rest[4 + n..];
            }
            Ok(out)
        }
        Compression::Lz4 => {
            let mut out = Vec::new();
            lz4_flex::frame::FrameDecoder::new(data).read_to_end(&mut out).map_err(|e| e.to_string())?;
            Ok(out)
        }
        #[cfg(feature = "zstd")]
        Compression::Zstd => zstd::stream::decode_all(data).map_err(|e| e.to_string()),
        #[cfg(not(feature = "zstd"))]
        Compression::Zstd => Err("zstd support is not compiled in".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..200_000u32).flat_map(|i| format!("record-{}-{}", i % 977, i / 3).into_bytes()).collect()
    }

    #[test]
    fn round_trips() {
        let data = sample();
        for codec in [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
            if cfg!(not(feature = "zstd")) && codec == Compression::Zstd {
                continue;
            }
            let c = compress(codec, &data).unwrap();
            if codec != Compression::None {
                assert!(c.len() < data.len() / 2, "{codec:?} compressed {} to {}", data.len(), c.len());
            }
            assert_eq!(decompress(codec, &c).unwrap(), data, "{codec:?}");
            assert_eq!(compress(codec, b"").map(|c| decompress(codec, &c).unwrap()).unwrap(), b"");
        }
    }

    #[test]
    fn snappy_is_xerial_framed() {
        // The bytes the Java client (snappy-java) writes for these records;
        // the same fixture kafka-protocol checks against.
        let records = b"\x18\x00\x00\x00\x01\x0csdfdsf\x00";
        let c = compress(Compression::Snappy, records).unwrap();
        assert_eq!(
            c,
            b"\x82\x53\x4e\x41\x50\x50\x59\x00\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00\x0f\x0d\x30\x18\x00\x00\x00\x01\x0csdfdsf\x00"
        );
    }

    #[test]
    fn lz4_frame_header() {
        let c = compress(Compression::Lz4, b"hello hello hello hello").unwrap();
        // Magic 0x184D2204 (little endian), FLG: version 01, block
        // independence set, no block/content checksum, no content size.
        assert_eq!(&c[..4], &[0x04, 0x22, 0x4d, 0x18]);
        assert_eq!(c[4], 0b0110_0000);
        // BD: 64 KiB maximum block size.
        assert_eq!(c[5], 0b0100_0000);
    }

    #[test]
    fn gzip_magic() {
        let c = compress(Compression::Gzip, b"x").unwrap();
        assert_eq!(&c[..2], &[0x1f, 0x8b]);
    }
}
