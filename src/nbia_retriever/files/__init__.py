"""Files fetched by URL, not series asked of an NBIA server (issue 24).

Controlled-access TCIA data now lives in the NCI Cancer Research Data Commons as GA4GH
DRS objects behind a Gen3 API key, and pathology slides come from PathDB as plain file
URLs of up to 2.5 GB. Both are rows of a manifest (:class:`~nbia_retriever.models.FileItem`)
and both are one HTTP GET of one file, so they share everything below the engine:

* :mod:`.gen3`: the Gen3 credentials file, the access token (fetched once per host,
  refreshed before its ``exp`` and once on a 401), and where the key may be sent;
* :mod:`.drs`: a DRS object's signed URL and its GA4GH size and MD5;
* :mod:`.transfer`: a resumable, verified download into the run's spool folder
  (``Range: bytes=N-`` from what was written and checked, in this run or the next);
* :mod:`.source`: :class:`~.source.FileSource`, the engine's source for these rows.

Nothing here is imported unless a manifest has such rows.
"""
