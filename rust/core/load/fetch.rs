//! The read-or-map choice for each array `load` hands out, and the sizes of the buffers it reads
//! into. The binding only carries these decisions out (allocates, maps, builds the arrays).
//!
//! Mapping policy: only files latentcache wrote are mapped; every other file is read (copied).
//! latentcache's writer never changes a file in place: it builds a new file and renames it over
//! the old one, so a private mapping keeps the old file's pages whole for as long as it lives. A
//! stock writer (`np.savez` into an open path) truncates and rewrites the same inode instead, and
//! a mapped page past the new end then kills the reading process with SIGBUS; so a file without
//! latentcache's marks is never mapped, whatever its alignment. The marks are the metadata member
//! (`latentcache_meta`, written on every `write_latents`) or the writer's 64-byte alignment field
//! (id `0xD935`) in a local header, either of which np.savez never writes.
//!
//! On Windows nothing is mapped: a live mapping of a file makes replacing it fail (the writer's
//! rename and `ReplaceFileW` both refuse while a section of the file exists), so a trainer holding
//! mapped arrays would make a concurrent `write_latents` of that cache fail. Reading costs a copy of
//! the flipped latents and alpha mask when they are present; it can never block a writer.
use super::{ArraySpec, LoadPlan, AFTER_LATENTS};
use crate::core::schema::Schema;

/// One of the arrays of a [`LoadPlan`] that `load` hands out as an ndarray.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Array {
    Latents,
    Flipped,
    AlphaMask,
}

/// What the caller of `load` asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request {
    /// Map the latents too (by default they are read: a training step touches them whole).
    pub map_latents: bool,
    /// Read every array; map nothing.
    pub copy: bool,
}

/// How one array reaches Python.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// A view of a private copy-on-write mapping of the whole file, at this file offset.
    Map { offset: u64 },
    /// A read into new memory of this many bytes (see [`read_buffer_len`] for its allocation).
    Read { nbytes: u64 },
}

impl LoadPlan {
    /// The spec of `which`, when the file holds it.
    pub fn array(&self, which: Array) -> Option<&ArraySpec> {
        match which {
            Array::Latents => Some(&self.latents),
            Array::Flipped => self.flipped.as_ref(),
            Array::AlphaMask => self.alpha_mask.as_ref(),
        }
    }
}

/// Whether this platform maps at all (see the module docs: not on Windows).
pub const PLATFORM_MAPS: bool = cfg!(not(windows));

/// The read-or-map choice for `which` of `plan` (see the module docs for the policy): mapped only
/// when the platform maps, the caller allows it, the file carries latentcache's marks, and the
/// array is stored at an offset aligned to its element size. `None` when the file has no such array.
pub fn fetch(plan: &LoadPlan, which: Array, req: Request) -> Option<Fetch> {
    let spec = plan.array(which)?;
    let wanted = PLATFORM_MAPS && !req.copy && (which != Array::Latents || req.map_latents);
    Some(match spec.mappable_offset() {
        Some(offset) if wanted && plan.written_by_latentcache => Fetch::Map { offset },
        _ => Fetch::Read {
            nbytes: spec.nbytes(),
        },
    })
}

/// Read buffers of 64 KiB and more are allocated in whole 64 KiB steps: the latents of neighbouring
/// buckets (1024x1024, 896x1152, 832x1216, ...) then ask the allocator for the same size, so a buffer
/// freed by one sample is reused as it is by the next, instead of the allocator taking fresh memory
/// (and a page fault per 4 KiB) whenever sizes differ by a few KiB.
pub const READ_STEP: u64 = 64 << 10;

/// Latents up to this size (a 16384x16384 bucket's are 256 MiB) are read while the file is planned,
/// into a buffer made before the file is looked at; beyond it, after planning (a nonsensical bucket
/// must not allocate before the file says it has no such latents).
const PRE_READ_MAX: u64 = 256 << 20;

/// The bytes to allocate for a read of `nbytes` (see [`READ_STEP`]).
pub fn read_buffer_len(nbytes: u64) -> u64 {
    if nbytes >= READ_STEP {
        nbytes.div_ceil(READ_STEP).saturating_mul(READ_STEP)
    } else {
        nbytes
    }
}

/// The buffer `plan_reading_latents` reads the latents into while it plans the file: the bucket's
/// float32 latents and the [`AFTER_LATENTS`] bytes after them, when the latents are to be read at
/// all (not `map_latents` unless `copy`) and that stays within [`PRE_READ_MAX`]; else `None` (plan
/// only, read afterwards).
pub fn pre_read_len(schema: &Schema, bucket_reso: (u32, u32), req: Request) -> Option<u64> {
    let want = schema
        .latents_nbytes(bucket_reso)
        .checked_add(AFTER_LATENTS as u64)?;
    ((req.copy || !req.map_latents) && want <= PRE_READ_MAX).then_some(want)
}

#[cfg(test)]
mod tests {
    use super::super::{open, plan_knowing};
    use super::*;
    use crate::core::meta::META_KEY;
    use crate::core::npy::testutil::savez_cache;
    use crate::core::schema::anima::ANIMA;
    use crate::core::write::{write_npz, NewArray, WriteOptions};

    const MAP_ALL: Request = Request {
        map_latents: true,
        copy: false,
    };

    fn plan_of(path: &std::path::Path, bucket: (u32, u32)) -> LoadPlan {
        plan_knowing(&open(path).unwrap(), path, &ANIMA, bucket, None).unwrap()
    }

    /// A cache for bucket 64x32 written by latentcache's writer: latents of `fill`, flipped latents,
    /// the two small arrays and, with `meta`, the metadata member.
    fn write_cache(path: &std::path::Path, fill: u8, meta: bool) {
        let lat = vec![fill; 16 * 4 * 8 * 4];
        let size = [0u8; 16];
        let crop = [0u8; 32];
        let json = br#"{"format":1}"#;
        let mut arrays = vec![
            NewArray {
                key: "latents_4x8".into(),
                descr: "<f4".into(),
                shape: vec![16, 4, 8],
                data: &lat,
            },
            NewArray {
                key: "latents_flipped_4x8".into(),
                descr: "<f4".into(),
                shape: vec![16, 4, 8],
                data: &lat,
            },
            NewArray {
                key: "original_size_4x8".into(),
                descr: "<i8".into(),
                shape: vec![2],
                data: &size,
            },
            NewArray {
                key: "crop_ltrb_4x8".into(),
                descr: "<f8".into(),
                shape: vec![4],
                data: &crop,
            },
        ];
        if meta {
            arrays.push(NewArray {
                key: META_KEY.into(),
                descr: "|u1".into(),
                shape: vec![json.len() as u64],
                data: json,
            });
        }
        write_npz(path, &arrays, &[], WriteOptions { durable: false }).unwrap();
    }

    #[test]
    fn stock_files_are_read_even_where_they_could_be_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s_1024x0128_anima.npz");
        // `latents_16x128.npy`: a name whose length puts the array data at a 4-aligned offset.
        std::fs::write(&p, savez_cache((16, 128), true, true, false, false)).unwrap();
        let plan = plan_of(&p, (1024, 128));
        assert!(!plan.written_by_latentcache);
        assert!(
            plan.latents.mappable_offset().is_some(),
            "alignment is not the reason"
        );
        for which in [Array::Latents, Array::Flipped, Array::AlphaMask] {
            let nbytes = plan.array(which).unwrap().nbytes();
            assert_eq!(fetch(&plan, which, MAP_ALL), Some(Fetch::Read { nbytes }));
        }
    }

    #[test]
    fn latentcache_files_are_mapped_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        for meta in [true, false] {
            // The writer's alignment field marks its files even without the metadata member.
            let p = dir.path().join(format!("w{meta}_0064x0032_anima.npz"));
            write_cache(&p, 1, meta);
            let plan = plan_of(&p, (64, 32));
            assert!(plan.written_by_latentcache);
            let off = |a: Array| plan.array(a).unwrap().mappable_offset().unwrap();
            let read = |a: Array| Fetch::Read {
                nbytes: plan.array(a).unwrap().nbytes(),
            };
            // Windows reads what other platforms map (module docs).
            let map = |a: Array| {
                if PLATFORM_MAPS {
                    Fetch::Map { offset: off(a) }
                } else {
                    read(a)
                }
            };
            let lat = Array::Latents;
            let flip = Array::Flipped;
            assert_eq!(fetch(&plan, lat, Request::default()), Some(read(lat)));
            assert_eq!(fetch(&plan, flip, Request::default()), Some(map(flip)));
            assert_eq!(fetch(&plan, lat, MAP_ALL), Some(map(lat)));
            let copy = Request {
                map_latents: true,
                copy: true,
            };
            assert_eq!(fetch(&plan, lat, copy), Some(read(lat)));
            assert_eq!(fetch(&plan, flip, copy), Some(read(flip)));
            assert_eq!(fetch(&plan, Array::AlphaMask, MAP_ALL), None);
            // The one-read path (as `load` plans) marks the file the same way.
            let mut buf =
                vec![0u8; pre_read_len(&ANIMA, (64, 32), Request::default()).unwrap() as usize];
            let f = open(&p).unwrap();
            let planned =
                super::super::plan_reading_latents(&f, &p, &ANIMA, (64, 32), &mut buf).unwrap();
            assert!(planned.plan.written_by_latentcache);
        }
    }

    /// What the policy promises: an array mapped from a file latentcache wrote keeps its bytes when
    /// the writer replaces that file (a rename: the mapping keeps the old file).
    #[cfg(unix)]
    #[test]
    fn a_mapped_array_survives_the_writer_replacing_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m_0064x0032_anima.npz");
        write_cache(&p, 0x11, true);
        let plan = plan_of(&p, (64, 32));
        let Some(Fetch::Map { offset }) = fetch(&plan, Array::Latents, MAP_ALL) else {
            panic!("a latentcache file's latents must be mapped when asked");
        };
        let nbytes = plan.latents.nbytes() as usize;
        let file = open(&p).unwrap();
        // SAFETY: a private read-only mapping of a file only latentcache's writer replaces (by
        // rename), which is what this test holds the policy to.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) }.unwrap();
        drop(file);
        let view = &map[offset as usize..offset as usize + nbytes];
        assert!(view.iter().all(|&b| b == 0x11));
        // Replaced twice, with a file of another size in between.
        write_cache(&p, 0x22, false);
        write_cache(&p, 0x33, true);
        assert!(view.iter().all(|&b| b == 0x11), "the mapped bytes changed");
        let now = plan_of(&p, (64, 32));
        let mut fresh = vec![0u8; nbytes];
        super::super::read_into_from(&open(&p).unwrap(), &p, &now.latents.entry, &mut fresh)
            .unwrap();
        assert!(fresh.iter().all(|&b| b == 0x33));
    }

    #[test]
    fn buffer_sizes() {
        assert_eq!(read_buffer_len(10), 10);
        assert_eq!(read_buffer_len(READ_STEP), READ_STEP);
        assert_eq!(read_buffer_len(READ_STEP + 1), 2 * READ_STEP);
        let n = ANIMA.latents_nbytes((1024, 1024)) + AFTER_LATENTS as u64;
        assert_eq!(
            pre_read_len(&ANIMA, (1024, 1024), Request::default()),
            Some(n)
        );
        assert_eq!(pre_read_len(&ANIMA, (1024, 1024), MAP_ALL), None);
        let copy = Request {
            map_latents: true,
            copy: true,
        };
        assert_eq!(pre_read_len(&ANIMA, (1024, 1024), copy), Some(n));
        assert_eq!(pre_read_len(&ANIMA, (1 << 20, 1 << 20), copy), None);
    }
}
