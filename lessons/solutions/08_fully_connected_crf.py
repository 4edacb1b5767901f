"""Lesson 08: a Potts kernel's mean-field message."""
CHECK = "check_potts_message"


def potts_message(lattice, n, Q, weight):
    # normalise symmetrically, filter, normalise again; a Potts weight rewards agreement
    return weight * n[:, None] * lattice.filter(n[:, None] * Q)


def normalised_once(lattice, n, Q, weight):
    return weight * (n ** 2)[:, None] * lattice.filter(Q)


SOLUTION, MISTAKE = potts_message, normalised_once
