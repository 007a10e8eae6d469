"""The NBIA server builds in the field, as the reference server can play them.

Read in the NBIA server's own source (``docs/NBIA-SOURCE-FACTS.md`` sections 2-5 and 8):
between April and November 2025 the v4 API changed its batch-metadata columns three
times and rejected ``IncludeMD5`` on ``getImage`` for half a year; servers of other
institutions still run builds without v4 at all. A client must get the same tree from
every one of them, so the reference server plays each (``--build NAME``):

========== =================================================================
current    v4 with ``getImage?IncludeMD5=yes`` (from 2025-11-26), CamelCase
           metadata columns (from 2025-10-05), ``getMD5Hierarchy``
2025-10    CamelCase columns; v4 ``getImage`` rejects ``IncludeMD5`` with 400
           "Invalid query parameter" (builds 2025-05-08 to 2025-11-25)
2025-08    spaced column names with ``Collection`` and ``Data Description
           URI`` (2025-08-29); ``IncludeMD5`` rejected
2025-06    spaced names with ``Project`` for Collection and ``Collection URI``
           (releases 9.5, 9.5.1): several rows per series, and rows of series
           the user may not see, with ``Authorized`` 0; ``IncludeMD5`` rejected; no v4
           ``getSOPInstanceUIDs`` (one image at a time is for later builds)
no-v4      v1/v2 only (releases before May 2025; other institutions)
========== =================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NbiaError

#: v4 getSeriesMetadata columns at HEAD (2025-10-05 on), in order.
CAMEL_COLUMNS = (
    "PatientID", "PatientName", "PatientSex", "EthnicGroup", "Phantom", "SpeciesCode",
    "SpeciesDescription", "StudyInstanceUID", "StudyDate", "StudyDesc",
    "AdmittingDiagnosisDescription", "StudyID", "PatientAge", "LongitudinalTemporalEventType",
    "LongitudinalTemporalOffsetFromEvent", "SeriesInstanceUID", "Collection", "Site",
    "Modality", "ProtocolName", "SeriesDate", "SeriesDescription", "BodyPartExamined",
    "SeriesNumber", "AnnotationsFlag", "Manufacturer", "ManufacturerModelName",
    "PixelSpacing(mm)-Row", "SliceThickness(mm)", "SoftwareVersions", "ImageCount",
    "MaxSubmissionTimestamp", "LicenseName", "LicenseURI", "DataDescriptionURI", "FileSize",
    "ReleasedStatus", "DateReleased", "ThirdPartyAnalysis", "Authorized",
)
#: 2025-08-29 to 2025-10-04: the same, spaced, 40 columns.
SPACED_COLUMNS = (
    "Patient ID", "Patient Name", "Patient Sex", "Ethnic Group", "Phantom", "Species Code",
    "Species Description", "Study Instance UID", "Study Date", "Study Description",
    "Admitting Diagnosis Description", "Study ID", "Patient Age",
    "Longitudinal Temporal Event Type", "Longitudinal Temporal Offset From Event",
    "Series Instance UID", "Collection", "Site", "Modality", "Protocol Name", "Series Date",
    "Series Description", "Body Part Examined", "Series Number", "Annotations Flag",
    "Manufacturer", "Manufacturer Model Name", "Pixel Spacing(mm)- Row",
    "Slice Thickness(mm)", "Software Versions", "Image Count", "Max Submission Timestamp",
    "License Name", "License URI", "Data Description URI", "File Size", "Released Status",
    "Date Released", "Third Party Analysis", "Authorized",
)
#: Releases 9.5 and 9.5.1 (2025-05-23 to 2025-07-14): 39 columns, Project.
PROJECT_COLUMNS = (
    "Patient ID", "Patient Name", "Patient Birth Date", "Patient Sex", "Ethnic Group",
    "Phantom", "Species Code", "Species Description", "Study Instance UID", "Study Date",
    "Study Description", "Admitting Diagnosis Description", "Study ID", "Patient Age",
    "Longitudinal Temporal Event Type", "Longitudinal Temporal Offset From Event",
    "Series Instance UID", "Project", "Modality", "Protocol Name", "Series Date",
    "Series Description", "Body Part Examined", "Series Number", "Annotations Flag",
    "Manufacturer", "Manufacturer Model Name", "Pixel Spacing(mm)- Row",
    "Slice Thickness(mm)", "Software Versions", "Image Count", "Max Submission Timestamp",
    "License Name", "License URI", "Collection URI", "File Size", "Date Released",
    "Third Party Analysis", "Authorized",
)


@dataclass(frozen=True)
class Build:
    """What differs between server builds, as far as a client can tell."""

    name: str
    has_v4: bool = True
    include_md5: bool = True  # v4 getImage accepts IncludeMD5
    columns: tuple[str, ...] = CAMEL_COLUMNS
    repeated_rows: bool = False  # one row per (pixel spacing, slice thickness)
    unauthorised_rows: bool = False  # rows of hidden series, with Authorized 0
    md5_hierarchy: bool = True
    #: v4 getSOPInstanceUIDs (since 2025-07-08: not in releases 9.5 and 9.5.1)
    v4_sop_list: bool = True

    @property
    def v4_image_params(self) -> frozenset[str]:
        base = {"SeriesInstanceUID", "NewFileNames"}
        return frozenset(base | {"IncludeMD5"} if self.include_md5 else base)


BUILDS: dict[str, Build] = {
    "current": Build("current"),
    "2025-10": Build("2025-10", include_md5=False),
    "2025-08": Build("2025-08", include_md5=False, columns=SPACED_COLUMNS),
    "2025-06": Build("2025-06", include_md5=False, columns=PROJECT_COLUMNS,
                     repeated_rows=True, unauthorised_rows=True, v4_sop_list=False),
    "no-v4": Build("no-v4", has_v4=False, md5_hierarchy=False),
}


def get_build(name: str | Build) -> Build:
    if isinstance(name, Build):
        return name
    try:
        return BUILDS[name]
    except KeyError:
        raise NbiaError(f"unknown server build {name!r}; known: {', '.join(BUILDS)}") \
            from None
