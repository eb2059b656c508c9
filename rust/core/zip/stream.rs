//! Members' payloads: a bounded prefix, or every byte in chunks (inflated when deflated) with
//! its size checked against the directory, in flat memory.
use std::fs::File;
use std::path::Path;

use flate2::{Decompress, FlushDecompress, Status as InflateStatus};

use super::source::{read_at, Chunk, Src};
use super::{Compression, Member, ReadError, ReadResult, CHUNK};

/// Feed a member's uncompressed bytes, in chunks, to `sink` until it returns `Ok(false)` or the
/// member ends. Reads at most `max_input` compressed bytes and inflates at most `out_chunk` bytes
/// per step. Returns (bytes out, whole member seen).
pub(super) fn for_each_chunk(
    src: &Src<'_>,
    m: &Member,
    max_input: u64,
    out_chunk: usize,
    sink: &mut dyn FnMut(&[u8]) -> ReadResult<bool>,
) -> ReadResult<(u64, bool)> {
    let ent = Some(m.name.as_str());
    let input_len = m.compressed_size.min(max_input);
    match m.compression {
        Compression::Stored => {
            let mut buf = vec![0u8; (input_len as usize).min(CHUNK)];
            let mut done = 0u64;
            while done < input_len {
                let n = (input_len - done).min(CHUNK as u64) as usize;
                read_at(src.file, &mut buf[..n], m.data_offset + done)
                    .map_err(|e| ReadError::io(src.path, ent, e))?;
                done += n as u64;
                if !sink(&buf[..n])? {
                    return Ok((done, done == m.uncompressed_size));
                }
            }
            Ok((done, done == m.uncompressed_size))
        }
        Compression::Deflated => {
            let mut inflater = Decompress::new(false);
            let mut inbuf = vec![0u8; (input_len as usize).min(CHUNK)];
            let mut outbuf = vec![0u8; out_chunk.clamp(1, CHUNK)];
            let mut read_in = 0u64;
            let (mut in_pos, mut in_end) = (0usize, 0usize);
            loop {
                if in_pos == in_end && read_in < input_len {
                    let n = (input_len - read_in).min(CHUNK as u64) as usize;
                    read_at(src.file, &mut inbuf[..n], m.data_offset + read_in)
                        .map_err(|e| ReadError::io(src.path, ent, e))?;
                    read_in += n as u64;
                    in_pos = 0;
                    in_end = n;
                }
                let (before_in, before_out) = (inflater.total_in(), inflater.total_out());
                let status = inflater
                    .decompress(&inbuf[in_pos..in_end], &mut outbuf, FlushDecompress::None)
                    .map_err(|e| src.malformed(ent, format!("bad deflate data: {e}")))?;
                let used = (inflater.total_in() - before_in) as usize;
                let made = (inflater.total_out() - before_out) as usize;
                in_pos += used;
                if inflater.total_out() > m.uncompressed_size {
                    return Err(src.malformed(
                        ent,
                        format!(
                            "inflates to more than the {} bytes the central directory gives",
                            m.uncompressed_size
                        ),
                    ));
                }
                if made > 0 && !sink(&outbuf[..made])? {
                    return Ok((inflater.total_out(), false));
                }
                if status == InflateStatus::StreamEnd {
                    let out = inflater.total_out();
                    if out != m.uncompressed_size {
                        return Err(src.malformed(
                            ent,
                            format!(
                                "inflates to {out} bytes, the central directory gives {}",
                                m.uncompressed_size
                            ),
                        ));
                    }
                    return Ok((out, true));
                }
                if used == 0 && made == 0 && in_pos == in_end && read_in >= input_len {
                    if input_len < m.compressed_size {
                        return Ok((inflater.total_out(), false));
                    }
                    return Err(src.malformed(ent, "the deflate stream ends before its last block"));
                }
                if used == 0 && made == 0 && in_pos < in_end {
                    return Err(src.malformed(ent, "the deflate stream makes no progress"));
                }
            }
        }
    }
}

/// Up to `max_len` bytes from the start of a member's uncompressed data (inflating only what is
/// needed, and reading at most `max_len` + 1 MiB of compressed input). A stored member's prefix is
/// one (cached) read of exactly the bytes wanted.
pub fn read_member_prefix_with(
    src: &Src<'_>,
    member: &Member,
    max_len: usize,
) -> ReadResult<Chunk> {
    let want = (max_len as u64).min(member.uncompressed_size) as usize;
    if want == 0 {
        return Ok(Chunk::owned(Vec::new()));
    }
    if member.compression == Compression::Stored {
        return src.read(
            member.data_offset,
            want as u64,
            Some(member.name.as_str()),
            "array header",
        );
    }
    let mut out = Vec::with_capacity(want);
    let max_input = (want as u64).saturating_add(1 << 20);
    for_each_chunk(src, member, max_input, want, &mut |chunk| {
        let take = (want - out.len()).min(chunk.len());
        out.extend_from_slice(&chunk[..take]);
        Ok(out.len() < want)
    })?;
    Ok(Chunk::owned(out))
}

/// Feed all of a member's uncompressed bytes to `sink`, in chunks of at most 256 KiB, checking
/// that it inflates to exactly its central-directory size. Memory stays flat.
pub fn stream_member(
    file: &File,
    path: &Path,
    member: &Member,
    mut sink: impl FnMut(&[u8]) -> ReadResult<()>,
) -> ReadResult<()> {
    let src = Src::new(file, path)?;
    let (_, complete) = for_each_chunk(&src, member, u64::MAX, CHUNK, &mut |c| {
        sink(c).map(|()| true)
    })?;
    if !complete {
        return Err(src.malformed(
            Some(&member.name),
            "the member's data is shorter than the central directory says",
        ));
    }
    Ok(())
}

/// CRC-32 of a member's uncompressed data (to compare with [`Member::crc32`]).
pub fn member_crc32(file: &File, path: &Path, member: &Member) -> ReadResult<u32> {
    let mut h = crc32fast::Hasher::new();
    stream_member(file, path, member, |c| {
        h.update(c);
        Ok(())
    })?;
    Ok(h.finalize())
}
