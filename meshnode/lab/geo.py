"""Where nodes are and how long packets take between them.

RTT between two nodes = great-circle distance between their cities, stretched by a path
inflation factor, at the speed of light in fibre, plus each node's last-mile RTT::

    rtt = 2 × distance_km × path_inflation / FIBRE_KM_PER_MS + last_mile_a + last_mile_b

City coordinates are the usual city-centre coordinates (GeoNames / Wikipedia), rounded
to 0.1°. The inflation factor and last-mile terms are scenario inputs with their sources
in the scenario file. Not modelled: congestion, jitter, loss, asymmetric routes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# Light in standard single-mode fibre (group index ~1.468): 299,792 / 1.468 km/s.
FIBRE_KM_PER_MS = 204.2
EARTH_RADIUS_KM = 6371.0  # mean radius; the spherical model is within 0.5% of WGS84 here


@dataclass(frozen=True)
class City:
    name: str
    lat: float
    lon: float


CITIES: dict[str, City] = {
    c.name: c
    for c in (
        City("Ashburn", 39.0, -77.5),
        City("New York", 40.7, -74.0),
        City("Chicago", 41.9, -87.6),
        City("Dallas", 32.8, -96.8),
        City("Los Angeles", 34.1, -118.2),
        City("San Francisco", 37.8, -122.4),
        City("Seattle", 47.6, -122.3),
        City("Toronto", 43.7, -79.4),
        City("Mexico City", 19.4, -99.1),
        City("Sao Paulo", -23.6, -46.6),
        City("Buenos Aires", -34.6, -58.4),
        City("London", 51.5, -0.1),
        City("Amsterdam", 52.4, 4.9),
        City("Frankfurt", 50.1, 8.7),
        City("Paris", 48.9, 2.4),
        City("Stockholm", 59.3, 18.1),
        City("Warsaw", 52.2, 21.0),
        City("Madrid", 40.4, -3.7),
        City("Moscow", 55.8, 37.6),
        City("Istanbul", 41.0, 29.0),
        City("Dubai", 25.2, 55.3),
        City("Mumbai", 19.1, 72.9),
        City("Bangalore", 13.0, 77.6),
        City("Singapore", 1.3, 103.8),
        City("Hong Kong", 22.3, 114.2),
        City("Shanghai", 31.2, 121.5),
        City("Seoul", 37.6, 127.0),
        City("Tokyo", 35.7, 139.7),
        City("Sydney", -33.9, 151.2),
        City("Johannesburg", -26.2, 28.0),
        City("Lagos", 6.5, 3.4),
    )
}


def great_circle_km(a: City, b: City) -> float:
    """Haversine distance between two cities."""
    la1, lo1, la2, lo2 = map(math.radians, (a.lat, a.lon, b.lat, b.lon))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin(
        (lo2 - lo1) / 2
    ) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


@dataclass(frozen=True)
class LatencyModel:
    """City-to-city RTT without last miles (``base_ms``); add both ends' last miles."""

    cities: tuple[str, ...]
    base_ms: npt.NDArray[np.float64]  # [i, j]: fibre-path RTT between city i and city j

    @classmethod
    def build(cls, cities: tuple[str, ...], path_inflation: float) -> LatencyModel:
        unknown = [c for c in cities if c not in CITIES]
        if unknown:
            raise ValueError(f"unknown cities {unknown}; known: {sorted(CITIES)}")
        n = len(cities)
        base = np.zeros((n, n))
        for i, a in enumerate(cities):
            for j, b in enumerate(cities):
                km = great_circle_km(CITIES[a], CITIES[b])
                base[i, j] = 2 * km * path_inflation / FIBRE_KM_PER_MS
        return cls(cities=cities, base_ms=base)

    def index(self, city: str) -> int:
        return self.cities.index(city)
