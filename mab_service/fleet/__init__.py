"""The fleet: replicas sharing their counts through Bigtable, fed by learners reading events from Pub/Sub.

Three deployables stand on this package: the replica side of a serving node (``replica``: the loop's fleet side,
``sink``: the events' Pub/Sub sink, ``fanout``: the counts the learners publish and the replicas follow), the learner
process (``learner``, started by ``mab-service learn``) and the one-off setup (``setup``, ``mab-service setup``);
``cli`` holds those two commands. What they share is one module each below them: ``schema`` (the table's families,
qualifiers, row keys and path) and ``requests`` (the Bigtable requests written as bytes); ``windows`` is the
learner's state of a shard (applied sets, committed windows).

``schema`` imports nothing of the project but ``errors``, so the ``bigtable:`` feature source
(``features/bigtable.py``, which reads the same counts) imports it without importing the fleet's clients, and this
package's ``__init__`` stays empty of imports: sources keep to their own floor (STYLE section 12) and the table's
layout has one definition.
"""
