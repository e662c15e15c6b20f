"""The normalizer: raw vendor records -> canonical events.

One consumer over every ``raw.<source>.<entity>`` topic whose source has a mapper module
(``normalizer.mappers.<source with - as _>``, exposing ``map_record(raw, settings) -> MapResult``), so a new
source is added by adding its module. The connection's settings (status overrides, field choices) come from
the ``connections`` table, cached. Unmappable records are dead-lettered with a reason that says what to fix.
"""
