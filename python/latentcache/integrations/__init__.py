"""latentcache inside other trainers: ``sd_scripts`` (kohya-ss sd-scripts) for now."""
