//! The rules a cache is judged by: what one expectation (schema, bucket, flip, alpha) requires,
//! key by key, and what is wrong with an array's dtype, order and shape under its rule. Pure
//! functions of header fields; the fast walk and the general validator both judge through them.
use crate::core::npy::{shape_repr, DType, ScalarKind};
use crate::core::schema::Schema;

/// What the cache must hold for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    /// The kind of cache: its key names, latent channels, stride and layouts.
    pub schema: &'static Schema,
    /// (W, H) in pixels.
    pub bucket_reso: (u32, u32),
    pub flip_aug: bool,
    pub alpha_mask: bool,
}

/// What a key must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    Latents,
    AlphaMask,
    OriginalSize,
    CropLtrb,
}

/// The keys one expectation requires, as (prefix, rule) with the shared `_{h}x{w}` suffix, built
/// on the stack: keys are matched as prefix + suffix, never formatted per file.
pub(crate) struct Required {
    sfx: [u8; 24],
    sfx_len: usize,
    list: [(&'static str, Rule); 5],
    len: usize,
}

impl Required {
    pub(crate) fn new(exp: &Expectation) -> Self {
        let schema = exp.schema;
        let mut sfx = [0u8; 24];
        let sfx_len = if schema.multi_resolution {
            use std::io::Write;
            let (h, w) = schema.latent_hw(exp.bucket_reso);
            let mut cur = std::io::Cursor::new(&mut sfx[..]);
            let _ = write!(cur, "_{h}x{w}");
            cur.position() as usize
        } else {
            0
        };
        let mut r = Required {
            sfx,
            sfx_len,
            list: [("", Rule::Latents); 5],
            len: 0,
        };
        let mut need = |prefix: &'static str, rule: Rule| {
            r.list[r.len] = (prefix, rule);
            r.len += 1;
        };
        let keys = &schema.keys;
        need(keys.latents, Rule::Latents);
        if exp.flip_aug {
            need(keys.latents_flipped, Rule::Latents);
        }
        need(keys.original_size, Rule::OriginalSize);
        need(keys.crop_ltrb, Rule::CropLtrb);
        if exp.alpha_mask {
            need(keys.alpha_mask, Rule::AlphaMask);
        }
        r
    }

    pub(crate) fn sfx(&self) -> &str {
        std::str::from_utf8(&self.sfx[..self.sfx_len]).unwrap_or("")
    }

    pub(crate) fn list(&self) -> &[(&'static str, Rule)] {
        &self.list[..self.len]
    }

    /// `key` is `prefix` followed by the suffix.
    pub(crate) fn is_key(&self, key: &[u8], prefix: &str) -> bool {
        // Bytes: called for every member of every file, it need not re-check the suffix's UTF-8.
        let sfx = &self.sfx[..self.sfx_len];
        key.len() == prefix.len() + sfx.len()
            && key.starts_with(prefix.as_bytes())
            && key.ends_with(sfx)
    }
}

/// The rules of one expectation: the schema and the expected latent and pixel sizes.
#[derive(Clone, Copy)]
pub(crate) struct Rules {
    schema: &'static Schema,
    h: u64,
    w: u64,
    h_px: u64,
    w_px: u64,
}

impl Rules {
    pub(crate) fn new(exp: &Expectation) -> Self {
        let (w_px, h_px) = exp.bucket_reso;
        let (h, w) = exp.schema.latent_hw(exp.bucket_reso);
        Rules {
            schema: exp.schema,
            h: u64::from(h),
            w: u64::from(w),
            h_px: u64::from(h_px),
            w_px: u64::from(w_px),
        }
    }

    /// What an array under `rule` must be, in words.
    pub(crate) fn expected(&self, rule: Rule) -> String {
        match rule {
            Rule::Latents => self.schema.expected_latents(self.h, self.w),
            Rule::AlphaMask => format!("float32 shape {}", shape_repr(&[self.h_px, self.w_px])),
            Rule::OriginalSize => "an integer dtype shape (2,)".to_owned(),
            Rule::CropLtrb => "an integer or float dtype shape (4,)".to_owned(),
        }
    }

    /// What, if anything, is wrong with an array of this dtype, order and shape under `rule`.
    pub(crate) fn fault(
        &self,
        dtype: &DType,
        fortran: bool,
        shape: &[u64],
        rule: Rule,
    ) -> Option<Fault> {
        let dtype_ok = dtype.is_native_order()
            && match rule {
                Rule::Latents | Rule::AlphaMask => dtype.kind == ScalarKind::F4,
                Rule::OriginalSize => dtype.is_integer(),
                Rule::CropLtrb => dtype.is_integer() || dtype.is_float(),
            };
        if !dtype_ok {
            return Some(Fault::Dtype);
        }
        let shape_ok = match rule {
            Rule::Latents => self.schema.accepts_latents(shape, self.h, self.w),
            Rule::AlphaMask => shape == [self.h_px, self.w_px],
            Rule::OriginalSize => shape == [2],
            Rule::CropLtrb => shape == [4],
        };
        if !shape_ok {
            return Some(Fault::Shape);
        }
        if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
            return Some(Fault::Order);
        }
        None
    }
}

/// Why an array fails its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Dtype,
    Shape,
    /// Fortran order with more than one non-trivial axis.
    Order,
}
