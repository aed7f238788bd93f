"""k-th nearest neighbour distance (being written; see issue 2)."""


def knn_distance(queries, bank, k, *, backend=None):
    raise NotImplementedError("knn_distance is being written")
