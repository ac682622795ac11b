"""The data catalog: classification of warehouse columns and its detectors (数据分级分类)."""
