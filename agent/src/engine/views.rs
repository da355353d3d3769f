//! Views of the tag table for status reports, `tags.list` and `tag.get`.

use super::State;
use crate::msg::TagView;
use crate::store::StoreError;

impl State {
    /// The tags the agent has heard of (the radio knows them or they
    /// checked in), sorted by id: the status report's tag records. Tags
    /// named only by pending tasks have no readings to report (they may be
    /// out of this AP's range); they count in the pending queue and
    /// `tags.list` shows them.
    pub(super) fn known_tag_views(&self, now: u64) -> Vec<TagView> {
        let mut ids: Vec<&str> = self.tags.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids.into_iter()
            .map(|id| self.view(id, now, false))
            .collect()
    }

    /// Up to `limit` tags, known or with a pending task, whose id is after
    /// `after`, sorted by id (`tags.list`). Reads only what the page needs,
    /// however many tags have pending tasks.
    pub(super) fn tag_views_after(
        &self,
        after: Option<&str>,
        limit: usize,
        now: u64,
    ) -> Result<Vec<TagView>, StoreError> {
        let pending = self.store.pending_tags_after(after, limit)?;
        let mut ids: Vec<&str> = self
            .tags
            .keys()
            .map(String::as_str)
            .filter(|id| after.is_none_or(|a| *id > a))
            .chain(pending.iter().map(String::as_str))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(limit);
        Ok(ids.into_iter().map(|id| self.tag_view(id, now)).collect())
    }

    pub(super) fn tag_view(&self, tag_id: &str, now: u64) -> TagView {
        self.view(tag_id, now, true)
    }

    /// A tag's view, with the radio's details only where they are shown.
    fn view(&self, tag_id: &str, now: u64, with_radio: bool) -> TagView {
        let entry = self.tags.get(tag_id);
        let t = entry.map(|t| t.rec.clone()).unwrap_or_default();
        TagView {
            tag_id: tag_id.to_owned(),
            online: t
                .last_seen
                .is_some_and(|s| now.saturating_sub(s) <= self.settings.offline_after_ms),
            battery_mv: t.battery_mv,
            rssi: t.rssi,
            content_hash: t.content_hash,
            last_seen: t.last_seen,
            pending_task: self.store.pending_of(tag_id).ok().flatten(),
            radio: entry.filter(|_| with_radio).and_then(|t| t.info.clone()),
        }
    }
}
