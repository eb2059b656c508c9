"""The cache files themselves: names, scans, checks, loading, writing and metadata. No torch here.

Modules: ``paths`` (names), ``scan`` (folders), ``validate`` (checks, staleness, ``verify_directory``),
``load``, ``write``, ``meta`` (``latentcache_meta`` and source fingerprints), ``handle``
(``latentcache.open``), ``bucket``. The public names are re-exported by ``latentcache`` itself; this
package re-exports nothing, so ``latentcache.cache.load`` is the module, never the function.
"""
