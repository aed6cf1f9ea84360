"""The eight components of the next-listen mixture: names, indices, weights.

Every per-component array (users' mixture weights, the oracle's `component`
column, the organic shares below) is in the order of `COMPONENTS`.
"""

import numpy as np

COMPONENTS = ("album", "artist", "neighbour", "fav_track", "fav_artist",
              "repeat", "trending", "explore")
(ALBUM, ARTIST, NEIGHBOUR, FAV_TRACK, FAV_ARTIST, REPEAT, TRENDING,
 EXPLORE) = range(len(COMPONENTS))

# Mean mixture weights; each user's weights are a Dirichlet draw around them,
# the larger the concentration the closer.
BASE_MIXTURE = np.array([0.14, 0.13, 0.16, 0.09, 0.13, 0.10, 0.13, 0.12])
MIXTURE_CONCENTRATION = 12.0

# P(is_organic) of a listen drawn from each component: recommendation
# surfaces (neighbour, trending, explore) are mostly non-organic.
ORGANIC_PROB = np.array([0.92, 0.85, 0.15, 0.9, 0.8, 0.9, 0.1, 0.05])
