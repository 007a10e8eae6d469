"""Imaging Data Commons: TCIA's public series in IDC's public cloud buckets.

Most public TCIA series are also in IDC, as one object per instance
(``s3://<bucket>/<crdc_series_uuid>/<crdc_instance_uuid>.dcm``), anonymous and with no
per-host politeness limit. This package finds a series in IDC's own index files
(:mod:`.index`, the ``idc-index-data`` package), lists and fetches its objects
(:mod:`.s3`, :mod:`.stream`), and is the ``idc`` source of the engine (:mod:`.source`):
the objects are staged, checked (ETag MD5s, header UIDs, instance count) and published
into the same Java tree as an NBIA download of the series.
"""
