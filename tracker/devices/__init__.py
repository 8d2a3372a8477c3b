"""Real devices and data sources in: phone apps, GPS units, GTFS-realtime feeds.

* :mod:`tracker.devices.identity` -- fleets, keys, registration on first sight;
* :mod:`tracker.devices.gateway` -- where reports enter the core, counted per source;
* :mod:`tracker.devices.osmand` -- the OsmAnd protocol (Traccar Client, GPS units);
* :mod:`tracker.devices.owntracks` -- OwnTracks' JSON messages;
* :mod:`tracker.devices.routes` -- both over HTTP (``/osmand``, ``/owntracks``);
* :mod:`tracker.devices.mqtt` -- OwnTracks over an MQTT broker;
* :mod:`tracker.devices.gtfsrt` -- GTFS-realtime VehiclePositions feeds, polled.

``docs/devices.md`` tells how to point each app or feed at the tracker.
"""

__all__: list[str] = []
