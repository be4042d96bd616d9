"""The weight sync, in one place (design §6): the learner publishes its weights to the actors.

* `weightsync.publisher` (learner side): `WeightPublisher` plans a sync, prepares its group and
  announcements, broadcasts the buckets and collects the members' acks (`publish`), all by one
  deadline.
* `weightsync.receiver` (actor side): `WeightReceiver` joins the announced group, receives into
  staging buffers, checks the seal and hands the weights to the engine to install.
* The mechanism both share, by topic: `errors` (WeightSyncError, Deadline), `layout` (what moves
  in which bucket), `seal` (checksums, the sync's secret, sealed store values, the seal), `group`
  (store, backend, formation, lifetime of the process group), `buckets` (posting and completing
  the broadcasts).

Layering: actor/ and learner/ import this package; it imports common/ only (design §13).
"""
