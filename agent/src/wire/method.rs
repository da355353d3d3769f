//! The remote methods of PROTOCOL §7, as one enum: the config's method
//! lists, the dispatcher and the docs all name methods through it, so a
//! method cannot be known to one and missing from another.

/// A method the agent implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    AgentStatus,
    TagsList,
    TagGet,
    TasksList,
    TaskCancel,
    TagRefresh,
    NetworkPermitJoin,
    NetworkChangeChannel,
}

impl Method {
    /// Every method, in the order of the unknown-method message.
    pub const ALL: [Method; 8] = [
        Method::AgentStatus,
        Method::TagsList,
        Method::TagGet,
        Method::TasksList,
        Method::TaskCancel,
        Method::TagRefresh,
        Method::NetworkPermitJoin,
        Method::NetworkChangeChannel,
    ];

    /// The method's name on the wire (`"tags.list"`).
    pub const fn name(self) -> &'static str {
        match self {
            Method::AgentStatus => "agent.status",
            Method::TagsList => "tags.list",
            Method::TagGet => "tag.get",
            Method::TasksList => "tasks.list",
            Method::TaskCancel => "task.cancel",
            Method::TagRefresh => "tag.refresh",
            Method::NetworkPermitJoin => "network.permit_join",
            Method::NetworkChangeChannel => "network.change_channel",
        }
    }

    /// The method a wire name stands for, if the agent implements it.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the method changes state: such methods run only from signed
    /// commands unless `security.allow_unsigned_methods` names them. Every
    /// new method that changes anything must answer `true` here.
    pub const fn mutating(self) -> bool {
        match self {
            Method::TaskCancel
            | Method::TagRefresh
            | Method::NetworkPermitJoin
            | Method::NetworkChangeChannel => true,
            Method::AgentStatus | Method::TagsList | Method::TagGet | Method::TasksList => false,
        }
    }

    /// Every method's name, comma-separated (for error messages).
    pub fn names(filter: impl Fn(Method) -> bool) -> String {
        let names: Vec<&str> = Method::ALL
            .into_iter()
            .filter(|m| filter(*m))
            .map(Method::name)
            .collect();
        names.join(", ")
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_as_its_method_and_nothing_else_does() {
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.name()), Some(m));
        }
        let mut names: Vec<&str> = Method::ALL.into_iter().map(Method::name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Method::ALL.len(), "names are unique");
        assert_eq!(Method::from_name("Tags.List"), None);
        assert_eq!(Method::from_name(""), None);
    }
}
