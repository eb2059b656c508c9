//! Bindings for `core::schema`: the `model=` argument every entry point takes, and the registry as
//! data for the test that holds `latentcache.models` to it.
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::core::schema::{self, Schema};

/// The registry key of a `model=` argument: a name, or an object with a `name` (a
/// `latentcache.models.ModelSchema`); None for None.
fn model_name(model: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    let Some(m) = model else { return Ok(None) };
    if m.is_none() {
        return Ok(None);
    }
    if let Ok(s) = m.cast::<PyString>() {
        return Ok(Some(s.to_str()?.to_owned()));
    }
    match m.getattr(pyo3::intern!(m.py(), "name")) {
        Ok(name) => Ok(Some(name.extract::<String>()?)),
        Err(_) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "model must be a name or a ModelSchema, got {}",
            m.get_type().name()?
        ))),
    }
}

/// The schema of a `model=` argument (the default for None).
pub(crate) fn schema_of(model: Option<&Bound<'_, PyAny>>) -> PyResult<&'static Schema> {
    match model_name(model)? {
        Some(name) => Ok(schema::lookup(&name)?),
        None => Ok(schema::DEFAULT),
    }
}

/// The schema and suffix of a call given `model=` and/or `suffix=` (see `core::schema::resolve`).
pub(crate) fn resolve(
    model: Option<&Bound<'_, PyAny>>,
    suffix: Option<&str>,
) -> PyResult<(&'static Schema, String)> {
    let name = model_name(model)?;
    Ok(schema::resolve(name.as_deref(), suffix)?)
}

/// The core's model registry as data, Anima first: one dict per schema with `name`, `suffix`,
/// `legacy_suffixes`, `channels`, `stride`, `multi_resolution`, `keys` (latents, latents_flipped,
/// original_size, crop_ltrb, alpha_mask), `layouts`, `takes` and `norm` (`kind`, `mean`, `std`,
/// `scale`, `shift`, as `latentcache.models.Normalisation` holds them).
#[pyfunction]
pub fn model_schemas(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    schema::ALL
        .iter()
        .map(|s| {
            let d = PyDict::new(py);
            d.set_item("name", s.name)?;
            d.set_item("suffix", s.suffix)?;
            d.set_item("legacy_suffixes", s.legacy_suffixes.to_vec())?;
            d.set_item("channels", s.channels)?;
            d.set_item("stride", s.stride)?;
            d.set_item("multi_resolution", s.multi_resolution)?;
            let k = &s.keys;
            d.set_item(
                "keys",
                (
                    k.latents,
                    k.latents_flipped,
                    k.original_size,
                    k.crop_ltrb,
                    k.alpha_mask,
                ),
            )?;
            let layouts: Vec<&str> = s.layouts.iter().map(|l| l.name()).collect();
            d.set_item("layouts", layouts)?;
            d.set_item("takes", s.takes.name())?;
            let norm = PyDict::new(py);
            norm.set_item("kind", s.norm.kind())?;
            let (mean, std, scale, shift): (&[f64], &[f64], f64, f64) = match s.norm {
                schema::Norm::None => (&[], &[], 1.0, 0.0),
                schema::Norm::MeanStd { mean, std } => (mean, std, 1.0, 0.0),
                schema::Norm::ScaleShift { scale, shift } => (&[], &[], scale, shift),
            };
            norm.set_item("mean", mean.to_vec())?;
            norm.set_item("std", std.to_vec())?;
            norm.set_item("scale", scale)?;
            norm.set_item("shift", shift)?;
            d.set_item("norm", norm)?;
            Ok(d)
        })
        .collect()
}
