//! The engine's inbox: jobs in the order they were sent, except that a preview or chat request is dropped
//! when a newer one of its kind is already waiting (the last position of the strength slider wins).
//! Nothing else is reordered or held back, so a Stop or Pause sent after a burst of previews is seen in its
//! turn.

use std::collections::VecDeque;

use crossbeam_channel::Receiver;

use crate::messages::Job;

pub struct Inbox {
    jobs: Receiver<Job>,
    /// Jobs taken from the channel (to look for newer previews and chats) but not handed out yet.
    waiting: VecDeque<Job>,
}

/// The jobs that a newer one of the same kind makes out of date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supersedable {
    Preview,
    Chat,
}

impl Supersedable {
    fn of(job: &Job) -> Option<Self> {
        match job {
            Job::Preview(_) => Some(Self::Preview),
            Job::Chat(_) => Some(Self::Chat),
            _ => None,
        }
    }
}

impl Inbox {
    pub fn new(jobs: Receiver<Job>) -> Self {
        Self {
            jobs,
            waiting: VecDeque::new(),
        }
    }

    /// The next job, waiting for one when `block` is set; `None` when there is none (or the app is gone).
    pub fn next(&mut self, block: bool) -> Option<Job> {
        loop {
            let job = match self.waiting.pop_front() {
                Some(job) => job,
                None if block => self.jobs.recv().ok()?,
                None => self.jobs.try_recv().ok()?,
            };
            if let Some(kind) = Supersedable::of(&job)
                && self.newer_waiting(kind)
            {
                continue;
            }
            return Some(job);
        }
    }

    /// Whether a request of `kind` waits: the one being rendered or answered is out of date and can be
    /// abandoned.
    pub fn newer_waiting(&mut self, kind: Supersedable) -> bool {
        self.waiting.extend(self.jobs.try_iter());
        self.waiting
            .iter()
            .any(|j| Supersedable::of(j) == Some(kind))
    }

    /// Puts `jobs` back in front of everything else, in their order (jobs held back during a run).
    pub fn put_back(&mut self, jobs: Vec<Job>) {
        for job in jobs.into_iter().rev() {
            self.waiting.push_front(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Inbox, Supersedable};
    use crate::messages::{
        ChatRequest, ChatSettings, Job, PreviewRequest, PreviewSettings, PreviewSource,
    };

    fn preview(id: u64) -> Job {
        Job::Preview(PreviewRequest {
            id,
            base_model: "m".into(),
            device: "cpu".into(),
            prediction_type: None,
            source: PreviewSource::Live,
            settings: PreviewSettings::default(),
        })
    }

    fn chat(id: u64) -> Job {
        Job::Chat(ChatRequest {
            id,
            base_model: "m".into(),
            device: "cpu".into(),
            source: PreviewSource::Live,
            messages: Vec::new(),
            settings: ChatSettings::default(),
            compare: false,
        })
    }

    #[test]
    fn an_older_chat_gives_way_to_a_newer_one_but_not_to_a_preview() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut inbox = Inbox::new(rx);
        for job in [chat(1), preview(2), chat(3), Job::Stop] {
            tx.send(job).unwrap();
        }
        assert!(inbox.newer_waiting(Supersedable::Chat));
        assert_eq!(inbox.next(false), Some(preview(2)));
        assert_eq!(inbox.next(false), Some(chat(3)));
        assert!(!inbox.newer_waiting(Supersedable::Chat));
        assert_eq!(inbox.next(false), Some(Job::Stop));
        assert_eq!(inbox.next(false), None);
    }

    #[test]
    fn older_previews_are_dropped_and_everything_else_keeps_its_turn() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut inbox = Inbox::new(rx);
        for job in [preview(1), Job::Pause, preview(2), Job::Stop] {
            tx.send(job).unwrap();
        }
        assert_eq!(inbox.next(false), Some(Job::Pause));
        tx.send(preview(3)).unwrap();
        assert_eq!(
            inbox.next(false),
            Some(Job::Stop),
            "preview 2 gives way to 3"
        );
        assert_eq!(inbox.next(false), Some(preview(3)));
        assert_eq!(inbox.next(false), None);
        inbox.put_back(vec![Job::Resume, Job::Stop]);
        tx.send(Job::Pause).unwrap();
        assert_eq!(inbox.next(true), Some(Job::Resume));
        assert_eq!(inbox.next(true), Some(Job::Stop));
        assert_eq!(inbox.next(true), Some(Job::Pause));
    }
}
