//! Named synchronisation objects that clients (and tasks, through their own clients)
//! share through the scheduler: Dask's `Lock` and `Semaphore` (leases), `Event`, `Variable`
//! and `Queue`.
//!
//! Every request is answered exactly once: at once, when what it waits for happens, or
//! `Withdrawn` when its client stops waiting first (a lease granted before the withdrawal
//! arrived stays granted: the client takes the grant). A client that leaves gives back its
//! leases (a task that died holding a lock does not hold it forever) and its waits end.

use crate::protocol::{ClientId, Coordinate, Coordinated, ToClient};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};

/// A request: its client and the client's number for it.
type RequestId = (ClientId, u64);

/// Answers to send, as the scheduler's outbox takes them.
pub(super) type Replies = Vec<(ClientId, ToClient)>;

fn answer(out: &mut Replies, (client, request): RequestId, reply: Coordinated) {
    out.push((client, ToClient::Coordinated { request, reply }));
}

/// A semaphore: `holders` have a lease, `waiting` queue for one in order.
struct Leases {
    max: u32,
    holders: Vec<RequestId>,
    waiting: VecDeque<RequestId>,
}

#[derive(Default)]
struct Event {
    set: bool,
    waiting: Vec<RequestId>,
}

#[derive(Default)]
struct Variable {
    value: Option<Bytes>,
    waiting: Vec<RequestId>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Bytes>,
    waiting: VecDeque<RequestId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Lease,
    Event,
    Variable,
    Queue,
}

#[derive(Default)]
pub(super) struct Coordination {
    leases: HashMap<String, Leases>,
    events: HashMap<String, Event>,
    variables: HashMap<String, Variable>,
    queues: HashMap<String, Queue>,
    /// Requests not answered yet, and granted leases: what each is on, to withdraw it.
    open: HashMap<RequestId, (Kind, String)>,
}

impl Coordination {
    pub(super) fn request(
        &mut self,
        client: ClientId,
        request: u64,
        op: Coordinate,
        out: &mut Replies,
    ) {
        let id = (client, request);
        match op {
            Coordinate::Acquire { name, max_leases } => {
                let leases = self.leases.entry(name.clone()).or_insert_with(|| Leases {
                    max: max_leases.max(1),
                    holders: Vec::new(),
                    waiting: VecDeque::new(),
                });
                self.open.insert(id, (Kind::Lease, name.clone()));
                leases.waiting.push_back(id);
                self.grant(&name, out);
            }
            Coordinate::Release { name, lease } => {
                let leased = (client, lease);
                let held = self
                    .leases
                    .get(&name)
                    .is_some_and(|l| l.holders.contains(&leased));
                if held {
                    self.give_back(leased, &name, out);
                    answer(out, id, Coordinated::Done);
                } else {
                    let why = format!("lease {lease} on {name:?} is not held by this client");
                    answer(out, id, Coordinated::Refused(why));
                }
            }
            Coordinate::Leases { name } => {
                let held = self.leases.get(&name).map_or(0, |l| l.holders.len());
                answer(out, id, Coordinated::Count(held as u64));
            }
            Coordinate::EventSet { name } => {
                let event = self.events.entry(name).or_default();
                event.set = true;
                for waiter in event.waiting.drain(..) {
                    self.open.remove(&waiter);
                    answer(out, waiter, Coordinated::Done);
                }
                answer(out, id, Coordinated::Done);
            }
            Coordinate::EventClear { name } => {
                self.events.entry(name).or_default().set = false;
                answer(out, id, Coordinated::Done);
            }
            Coordinate::EventWait { name } => {
                let event = self.events.entry(name.clone()).or_default();
                if event.set {
                    answer(out, id, Coordinated::Done);
                } else {
                    event.waiting.push(id);
                    self.open.insert(id, (Kind::Event, name));
                }
            }
            Coordinate::EventIsSet { name } => {
                let set = self.events.get(&name).is_some_and(|e| e.set);
                answer(out, id, Coordinated::Flag(set));
            }
            Coordinate::VariableSet { name, value } => {
                let variable = self.variables.entry(name).or_default();
                for waiter in variable.waiting.drain(..) {
                    self.open.remove(&waiter);
                    answer(out, waiter, Coordinated::Value(value.clone()));
                }
                variable.value = Some(value);
                answer(out, id, Coordinated::Done);
            }
            Coordinate::VariableGet { name } => {
                let variable = self.variables.entry(name.clone()).or_default();
                match &variable.value {
                    Some(value) => answer(out, id, Coordinated::Value(value.clone())),
                    None => {
                        variable.waiting.push(id);
                        self.open.insert(id, (Kind::Variable, name));
                    }
                }
            }
            Coordinate::VariableDelete { name } => {
                if let Some(variable) = self.variables.get_mut(&name) {
                    variable.value = None;
                    if variable.waiting.is_empty() {
                        self.variables.remove(&name);
                    }
                }
                answer(out, id, Coordinated::Done);
            }
            Coordinate::QueuePut { name, value } => {
                let queue = self.queues.entry(name).or_default();
                match queue.waiting.pop_front() {
                    Some(waiter) => {
                        self.open.remove(&waiter);
                        answer(out, waiter, Coordinated::Value(value));
                    }
                    None => queue.items.push_back(value),
                }
                answer(out, id, Coordinated::Done);
            }
            Coordinate::QueueGet { name } => {
                let queue = self.queues.entry(name.clone()).or_default();
                match queue.items.pop_front() {
                    Some(value) => answer(out, id, Coordinated::Value(value)),
                    None => {
                        queue.waiting.push_back(id);
                        self.open.insert(id, (Kind::Queue, name));
                    }
                }
            }
            Coordinate::QueueSize { name } => {
                let size = self.queues.get(&name).map_or(0, |q| q.items.len());
                answer(out, id, Coordinated::Count(size as u64));
            }
        }
    }

    /// The client stopped waiting for `request`: a wait ends `Withdrawn`. A request answered
    /// already (a lease granted, a value sent) stands: the client takes that answer.
    pub(super) fn withdraw(&mut self, client: ClientId, request: u64, out: &mut Replies) {
        let id = (client, request);
        let granted = self.open.get(&id).is_some_and(|(kind, name)| {
            *kind == Kind::Lease
                && self
                    .leases
                    .get(name)
                    .is_some_and(|l| l.holders.contains(&id))
        });
        if !granted {
            self.close(id, true, out);
        }
    }

    /// Everything `client` holds is given back and its waits end, unanswered.
    pub(super) fn client_left(&mut self, client: ClientId, out: &mut Replies) {
        let mut ids: Vec<RequestId> = self
            .open
            .keys()
            .filter(|(c, _)| *c == client)
            .copied()
            .collect();
        ids.sort_unstable(); // leases pass to others in a stable order
        for id in ids {
            self.close(id, false, out);
        }
    }

    /// Ends `id`'s wait (answering it `Withdrawn` if `answer_it`) or gives back its lease;
    /// leases freed go to the next waiters.
    fn close(&mut self, id: RequestId, answer_it: bool, out: &mut Replies) {
        let Some((kind, name)) = self.open.remove(&id) else {
            return; // answered already
        };
        match kind {
            Kind::Lease => {
                if let Some(leases) = self.leases.get_mut(&name) {
                    if leases.holders.contains(&id) {
                        self.give_back(id, &name, out);
                        return;
                    }
                    leases.waiting.retain(|w| *w != id);
                }
            }
            Kind::Event => {
                if let Some(event) = self.events.get_mut(&name) {
                    event.waiting.retain(|w| *w != id);
                }
            }
            Kind::Variable => {
                if let Some(variable) = self.variables.get_mut(&name) {
                    variable.waiting.retain(|w| *w != id);
                }
            }
            Kind::Queue => {
                if let Some(queue) = self.queues.get_mut(&name) {
                    queue.waiting.retain(|w| *w != id);
                }
            }
        }
        if answer_it {
            answer(out, id, Coordinated::Withdrawn);
        }
        self.forget_if_unused(&name, kind);
    }

    fn give_back(&mut self, lease: RequestId, name: &str, out: &mut Replies) {
        if let Some(leases) = self.leases.get_mut(name) {
            leases.holders.retain(|h| *h != lease);
        }
        self.open.remove(&lease);
        self.grant(name, out);
    }

    /// Grants leases of `name` to its first waiters while there are leases free.
    fn grant(&mut self, name: &str, out: &mut Replies) {
        if let Some(leases) = self.leases.get_mut(name) {
            while leases.holders.len() < leases.max as usize {
                let Some(next) = leases.waiting.pop_front() else {
                    break;
                };
                leases.holders.push(next);
                answer(out, next, Coordinated::Granted);
            }
        }
        self.forget_if_unused(name, Kind::Lease);
    }

    /// A semaphore nobody holds or waits for, a variable with neither value nor waiter,
    /// an empty queue nobody waits on: nothing to keep (events keep whether they are set).
    fn forget_if_unused(&mut self, name: &str, kind: Kind) {
        let unused = match kind {
            Kind::Lease => self
                .leases
                .get(name)
                .is_some_and(|l| l.holders.is_empty() && l.waiting.is_empty()),
            Kind::Variable => self
                .variables
                .get(name)
                .is_some_and(|v| v.value.is_none() && v.waiting.is_empty()),
            Kind::Queue => self
                .queues
                .get(name)
                .is_some_and(|q| q.items.is_empty() && q.waiting.is_empty()),
            Kind::Event => false,
        };
        if unused {
            match kind {
                Kind::Lease => {
                    self.leases.remove(name);
                }
                Kind::Variable => {
                    self.variables.remove(name);
                }
                Kind::Queue => {
                    self.queues.remove(name);
                }
                Kind::Event => {}
            }
        }
    }
}

#[cfg(test)]
impl Coordination {
    /// Every open request is where its kind says: a lease holder or waiter, a waiter on
    /// an event, a variable or a queue; and every holder or waiter is open.
    pub(super) fn sanity_check(&self) {
        let mut listed = 0;
        for (name, leases) in &self.leases {
            assert!(
                leases.holders.len() <= leases.max as usize,
                "{name}: over its leases"
            );
            assert!(
                leases.waiting.is_empty() || leases.holders.len() == leases.max as usize,
                "{name}: a lease free while requests wait"
            );
            for id in leases.holders.iter().chain(&leases.waiting) {
                assert_eq!(self.open.get(id), Some(&(Kind::Lease, name.clone())));
                listed += 1;
            }
        }
        for (name, event) in &self.events {
            assert!(
                !event.set || event.waiting.is_empty(),
                "{name}: set with waiters"
            );
            for id in &event.waiting {
                assert_eq!(self.open.get(id), Some(&(Kind::Event, name.clone())));
                listed += 1;
            }
        }
        for (name, variable) in &self.variables {
            assert!(variable.value.is_none() || variable.waiting.is_empty());
            for id in &variable.waiting {
                assert_eq!(self.open.get(id), Some(&(Kind::Variable, name.clone())));
                listed += 1;
            }
        }
        for (name, queue) in &self.queues {
            assert!(queue.items.is_empty() || queue.waiting.is_empty());
            for id in &queue.waiting {
                assert_eq!(self.open.get(id), Some(&(Kind::Queue, name.clone())));
                listed += 1;
            }
        }
        assert_eq!(listed, self.open.len(), "open requests that nothing lists");
    }
}
