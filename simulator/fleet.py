"""A logistics fleet that drives a synthetic city and produces realistic GPS pings.

Vans and trucks leave a depot, drive to delivery stops in their district along the
streets of :class:`~simulator.city.City`, dwell at each stop, return to the depot to
reload, and start over. Their devices ping every few seconds with GPS noise, and misbehave
the way real ones do: dropouts (a tunnel), duplicated and out-of-order pings, devices that
go offline for minutes and come back.

Everything per vehicle is a NumPy column, so stepping 100k vehicles costs milliseconds;
only events that are rare per vehicle (reaching a corner, finishing a dwell) run in
Python. One seeded generator drives every random choice, so a seed and a sequence of
:meth:`Fleet.advance` steps always produce the same pings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Annotated

import msgspec
import numpy as np
import numpy.typing as npt

from simulator.city import BLOCK_M, City, FloatArray, Route
from tracker.config import describe

__all__ = ["Fleet", "FleetConfig", "PingBatch"]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

DRIVING, DWELLING = 0, 1
SLOW_ZONE_M = 40.0
"""Vehicles slow down within this distance of a turn or stop, and speed up after one."""
DROPOUT_S = (10.0, 60.0)
OFFLINE_S = (120.0, 900.0)


class FleetConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The simulated city and fleet; the same config and seed give the same pings."""

    seed: Annotated[int, describe("Random seed: the same seed gives the same fleet and pings.")] = 1
    vehicles: Annotated[int, describe("Number of vehicles in the fleet.", ge=1)] = 1000
    center_lat: Annotated[float, describe("City centre latitude.", ge=-80, le=80)] = 52.52
    center_lon: Annotated[float, describe("City centre longitude.", ge=-180, le=180)] = 13.405
    radius_m: Annotated[
        float, describe("City radius in metres: no vehicle leaves it.", ge=1000, le=50_000)
    ] = 8000.0
    ping_interval_min_s: Annotated[
        float, describe("Shortest per-vehicle ping interval (seconds).", gt=0)
    ] = 1.0
    ping_interval_max_s: Annotated[
        float, describe("Longest per-vehicle ping interval (seconds).", gt=0)
    ] = 5.0
    gps_noise_m: Annotated[
        float, describe("GPS position noise, standard deviation in metres.", ge=0)
    ] = 4.0
    truck_share: Annotated[
        float, describe("Fraction of the fleet that are trucks.", ge=0, le=1)
    ] = 0.25
    dropout_rate: Annotated[
        float,
        describe("Chance per ping that a dropout (10-60 s without pings) starts.", ge=0, le=1),
    ] = 0.001
    offline_rate: Annotated[
        float, describe("Chance per ping that the device goes offline for 2-15 min.", ge=0, le=1)
    ] = 0.00005
    duplicate_rate: Annotated[
        float, describe("Chance per ping that it is sent twice.", ge=0, le=1)
    ] = 0.005
    out_of_order_rate: Annotated[
        float, describe("Chance per ping that it arrives after the vehicle's next one.", ge=0, le=1)
    ] = 0.005

    def __post_init__(self) -> None:
        if self.ping_interval_min_s > self.ping_interval_max_s:
            raise ValueError("ping_interval_min_s must not exceed ping_interval_max_s")


@dataclass(frozen=True)
class PingBatch:
    """Pings as columns; ``vehicle`` indexes :attr:`Fleet.vehicle_ids`."""

    vehicle: IntArray
    lat: FloatArray
    lon: FloatArray
    ts: FloatArray
    speed: FloatArray
    heading: FloatArray

    def __len__(self) -> int:
        return len(self.vehicle)

    def rows(self) -> Iterator[tuple[int, float, float, float, float, float]]:
        """Each ping as Python numbers ``(vehicle, lat, lon, ts, speed, heading)``, in order:
        what building one ``Ping`` per row needs (``tolist`` once per column, not NumPy
        scalars one at a time)."""
        return zip(
            self.vehicle.tolist(),
            self.lat.tolist(),
            self.lon.tolist(),
            self.ts.tolist(),
            self.speed.tolist(),
            self.heading.tolist(),
            strict=True,
        )

    def take(self, rows: IntArray) -> PingBatch:
        """The pings at ``rows``, in that order."""
        return PingBatch(*(getattr(self, column.name)[rows] for column in fields(self)))

    @staticmethod
    def concat(batches: list[PingBatch]) -> PingBatch:
        """One batch with the pings of ``batches``, in order."""
        return PingBatch(
            *(
                np.concatenate([getattr(b, column.name) for b in batches])
                for column in fields(PingBatch)
            )
        )

    @staticmethod
    def empty() -> PingBatch:
        """A batch of no pings."""
        nothing = np.zeros(0)
        return PingBatch(np.zeros(0, dtype=np.int64), nothing, nothing, nothing, nothing, nothing)


@dataclass(frozen=True)
class _Kind:
    """What distinguishes a van from a truck."""

    name: str
    pace: tuple[float, float]
    """Range of the driver's speed as a fraction of the limit."""
    stops: tuple[int, int]
    dwell_s: tuple[float, float]


VAN = _Kind("van", pace=(0.9, 1.1), stops=(8, 20), dwell_s=(60, 300))
TRUCK = _Kind("truck", pace=(0.8, 0.95), stops=(3, 6), dwell_s=(300, 900))
DEPOT_DWELL_S = (600.0, 1200.0)
VAN_DISTRICT_BLOCKS = 9.0
"""A van's stops are within this many blocks (1.6 km) of its district centre; a truck's
are anywhere in the city."""


class Fleet:
    """The fleet's state; :meth:`advance` moves it on and returns the pings that fell due."""

    def __init__(self, config: FleetConfig, *, start_time: float) -> None:
        self.config = config
        self.start_time = start_time
        self.now = 0.0
        """Simulated seconds since ``start_time``."""
        self.city = City(config.center_lat, config.center_lon, config.radius_m, config.seed)
        self._rng = np.random.default_rng(config.seed)
        n = config.vehicles
        rng = self._rng
        self._is_truck = rng.random(n) < config.truck_share
        self.vehicle_ids = [
            f"{TRUCK.name if truck else VAN.name}-{number:05d}"
            for number, truck in enumerate(self._is_truck.tolist())
        ]
        self._pace = np.where(
            self._is_truck, rng.uniform(*TRUCK.pace, n), rng.uniform(*VAN.pace, n)
        )
        self._traffic = rng.uniform(0.7, 1.0, n)
        self._plan_tours(n)
        self._place(n)
        self._interval = rng.uniform(config.ping_interval_min_s, config.ping_interval_max_s, n)
        self._next_ping = rng.uniform(0, self._interval)
        self._silent_until = np.zeros(n)
        self._held = PingBatch.empty()
        """Pings held back, to be sent after their vehicle's next one (out of order)."""

    # --- set-up --------------------------------------------------------------------------

    def _plan_tours(self, n: int) -> None:
        """Depots in the city, a delivery district per van (trucks serve the whole city)."""
        rng, city = self._rng, self.city
        depots = max(2, min(12, n // 250))
        depot_u, depot_v = city.street_points(
            rng, np.zeros(depots), np.zeros(depots), np.full(depots, city.radius)
        )
        depot = rng.integers(depots, size=n)
        self._depot_u, self._depot_v = depot_u[depot], depot_v[depot]
        self._district_u, self._district_v = city.street_points(
            rng, np.zeros(n), np.zeros(n), np.full(n, city.radius)
        )
        self._district_u[self._is_truck] = self._district_v[self._is_truck] = 0.0
        self._spread = np.where(self._is_truck, city.radius, VAN_DISTRICT_BLOCKS)
        self._stops_left = np.where(
            self._is_truck,
            rng.integers(TRUCK.stops[0], TRUCK.stops[1] + 1, n),
            rng.integers(VAN.stops[0], VAN.stops[1] + 1, n),
        )

    def _place(self, n: int) -> None:
        """Start everyone mid-tour (driving or at a stop) so the city is busy from second one."""
        rng = self._rng
        self._state = np.full(n, DWELLING)
        self._u, self._v = self._next_stops(np.arange(n))
        self._target_u, self._target_v = self._u.copy(), self._v.copy()
        self._limit = np.zeros(n)
        self._leg_done = np.zeros(n)
        self._speed = np.zeros(n)
        self._heading = rng.uniform(0, 360, n)
        self._dwell_until = rng.uniform(0, VAN.dwell_s[1], n)
        self._to_depot = np.zeros(n, dtype=bool)
        self._routes: list[Route] = [[] for _ in range(n)]
        self._depart(np.flatnonzero(rng.random(n) < 0.6))

    def _kind(self, i: int) -> _Kind:
        return TRUCK if self._is_truck[i] else VAN

    def _next_stops(self, vehicles: IntArray) -> tuple[FloatArray, FloatArray]:
        return self.city.street_points(
            self._rng,
            self._district_u[vehicles],
            self._district_v[vehicles],
            self._spread[vehicles],
        )

    # --- driving -------------------------------------------------------------------------

    def _depart(self, vehicles: IntArray) -> None:
        """Leave the current stop for the next one, or for the depot when the tour is done."""
        to_depot = self._stops_left[vehicles] == 0
        self._to_depot[vehicles] = to_depot
        self._stops_left[vehicles[~to_depot]] -= 1
        end_u, end_v = self._next_stops(vehicles)
        end_u[to_depot] = self._depot_u[vehicles[to_depot]]
        end_v[to_depot] = self._depot_v[vehicles[to_depot]]
        self._state[vehicles] = DRIVING
        for i, u, v in zip(vehicles.tolist(), end_u.tolist(), end_v.tolist(), strict=True):
            self._routes[i] = self.city.route((self._u[i], self._v[i]), (u, v))
            self._start_leg(i)

    def _start_leg(self, i: int) -> None:
        u, v = self._routes[i].pop(0)
        self._target_u[i], self._target_v[i] = u, v
        line = self._u[i] if u == self._u[i] else self._v[i]
        self._limit[i] = self.city.speed_limit(line)
        self._leg_done[i] = 0.0

    def _arrive(self, i: int) -> None:
        """Reached the end of a route: dwell at the stop, or reload at the depot."""
        self._state[i] = DWELLING
        self._speed[i] = 0.0
        if self._to_depot[i]:
            low_stops, high_stops = self._kind(i).stops
            self._stops_left[i] = self._rng.integers(low_stops, high_stops + 1)
            low, high = DEPOT_DWELL_S
        else:
            low, high = self._kind(i).dwell_s
        self._dwell_until[i] = self.now + self._rng.uniform(low, high)

    def _drive(self, dt: float) -> None:
        """Move every driving vehicle ``dt`` seconds along its route.

        Works on whole columns (a dwelling vehicle has speed 0 and its target where it
        is): at 100k vehicles that is cheaper than gathering the driving ones first.
        """
        driving = self._state == DRIVING
        self._traffic = np.clip(
            self._traffic + self._rng.normal(0, 0.05 * math.sqrt(dt), len(driving)), 0.55, 1.05
        )
        du, dv = self._target_u - self._u, self._target_v - self._v
        remaining = (np.abs(du) + np.abs(dv)) * BLOCK_M
        ease = np.clip(0.3 + np.minimum(remaining, self._leg_done) / SLOW_ZONE_M, 0.3, 1.0)
        self._speed = self._limit * self._pace * self._traffic * ease * driving
        step = self._speed * dt
        along = step < remaining
        fraction = np.where(along, step / np.maximum(remaining, 1e-9), 1.0)
        self._u += du * fraction
        self._v += dv * fraction
        self._leg_done += step
        turning = np.flatnonzero(driving & ~along)
        for i, leftover in zip(turning.tolist(), (step - remaining)[turning].tolist(), strict=True):
            self._turn(i, leftover)

    def _turn(self, i: int, leftover_m: float) -> None:
        """At a waypoint: take the next leg (carrying on ``leftover_m``), or arrive."""
        while True:
            self._u[i], self._v[i] = self._target_u[i], self._target_v[i]
            if not self._routes[i]:
                self._arrive(i)
                return
            self._start_leg(i)
            length = (
                abs(self._target_u[i] - self._u[i]) + abs(self._target_v[i] - self._v[i])
            ) * BLOCK_M
            if leftover_m < length:
                fraction = leftover_m / length
                self._u[i] += (self._target_u[i] - self._u[i]) * fraction
                self._v[i] += (self._target_v[i] - self._v[i]) * fraction
                self._leg_done[i] = leftover_m
                return
            leftover_m -= length

    def _finish_dwells(self) -> None:
        self._depart(np.flatnonzero((self._state == DWELLING) & (self._dwell_until <= self.now)))

    # --- pinging -------------------------------------------------------------------------

    def advance(self, dt: float) -> PingBatch:
        """Move the fleet ``dt`` simulated seconds on; the pings sent meanwhile, in order."""
        self.now += dt
        self._finish_dwells()
        self._drive(dt)
        return self._pings()

    def _pings(self) -> PingBatch:
        """Pings of every vehicle whose interval is up, with the configured misbehaviour."""
        return self._misbehave(self._measure(self._due()))

    def _due(self) -> IntArray:
        """Vehicles whose ping falls due now and whose device is not silent."""
        config, rng, now = self.config, self._rng, self.now
        due = np.flatnonzero(self._next_ping <= now)
        jitter = rng.uniform(0.9, 1.1, len(due))
        self._next_ping[due] = np.maximum(self._next_ping[due] + self._interval[due] * jitter, now)
        due = due[self._silent_until[due] <= now]
        rolls = rng.random((2, len(due)))
        self._fall_silent(due[rolls[0] < config.dropout_rate], DROPOUT_S)
        self._fall_silent(due[rolls[1] < config.offline_rate], OFFLINE_S)
        return due[self._silent_until[due] <= now]

    def _misbehave(self, fresh: PingBatch) -> PingBatch:
        """Hold some pings back, send held ones after their vehicle's next, duplicate some.

        A vehicle has at most one ping held back, so every held ping is overtaken by
        exactly one newer ping: out of order by one, as a delayed packet would be.
        """
        config, held = self.config, self._held
        rolls = self._rng.random((2, len(fresh)))
        pinged, holding = self._vehicle_mask(fresh.vehicle), self._vehicle_mask(held.vehicle)
        release = pinged[held.vehicle]
        hold = (rolls[0] < config.out_of_order_rate) & ~holding[fresh.vehicle]
        duplicate = (rolls[1] < config.duplicate_rate) & ~hold
        self._held = PingBatch.concat(
            [held.take(np.flatnonzero(~release)), fresh.take(np.flatnonzero(hold))]
        )
        return PingBatch.concat(
            [
                fresh.take(np.flatnonzero(~hold)),
                held.take(np.flatnonzero(release)),
                fresh.take(np.flatnonzero(duplicate)),
            ]
        )

    def _vehicle_mask(self, vehicles: IntArray) -> BoolArray:
        mask = np.zeros(len(self.vehicle_ids), dtype=bool)
        mask[vehicles] = True
        return mask

    def _fall_silent(self, vehicles: IntArray, duration_s: tuple[float, float]) -> None:
        self._silent_until[vehicles] = self.now + self._rng.uniform(*duration_s, len(vehicles))

    def _measure(self, vehicles: IntArray) -> PingBatch:
        """What the devices of ``vehicles`` report now: noisy position, speed, heading."""
        rng, city, n = self._rng, self.city, len(vehicles)
        u, v = self._u[vehicles], self._v[vehicles]
        driving = self._state[vehicles] == DRIVING
        self._heading[vehicles[driving]] = city.heading(
            u[driving],
            v[driving],
            (self._target_u[vehicles] - u)[driving],
            (self._target_v[vehicles] - v)[driving],
        )
        lat, lon = city.to_lat_lon(u, v)
        noise = rng.normal(0.0, self.config.gps_noise_m, (2, n))
        dlat, dlon = city.offset_to_degrees(noise[0], noise[1])
        speed = np.maximum(0.0, self._speed[vehicles] + rng.normal(0.0, 0.3, n))
        speed[~driving] = 0.0
        return PingBatch(
            vehicles,
            lat + dlat,
            lon + dlon,
            np.full(n, self.start_time + self.now),
            speed,
            self._heading[vehicles],
        )
