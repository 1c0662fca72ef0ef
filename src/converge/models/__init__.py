"""SQLAlchemy tables, one module per table. Importing this package registers them all."""

from converge.models.api_key import ApiKey
from converge.models.audit import AuditRecord
from converge.models.base import Base
from converge.models.chat import (
    Agent,
    AgentRevision,
    ChatMessage,
    ChatSession,
    DeploymentRuleset,
    McpServer,
    RagModel,
    RagModelRevision,
    Ruleset,
    RulesetVersion,
)
from converge.models.cost import PriceCatalogueVersion, ProjectBudget, ReplicaUsageDaily, UsageDaily
from converge.models.deployment import Build, Deployment, DeploymentRevision
from converge.models.drift import DriftReference, DriftWindow
from converge.models.event import Event
from converge.models.lease import LeaderLease
from converge.models.library import Approval, Artifact, LibraryModel, ModelVersion
from converge.models.member import Member
from converge.models.policy import Policy, PolicyRevision
from converge.models.project import Project
from converge.models.rag import IngestionJob, KbChunk, KbDocument, KnowledgeBase
from converge.models.source import Source, SourceItem
from converge.models.usage import GatewayCounter, UsageRecord

__all__ = [
    "Agent",
    "AgentRevision",
    "ChatMessage",
    "ChatSession",
    "DeploymentRuleset",
    "McpServer",
    "RagModel",
    "RagModelRevision",
    "Ruleset",
    "RulesetVersion",
    "ApiKey",
    "Approval",
    "Artifact",
    "AuditRecord",
    "Base",
    "Build",
    "Deployment",
    "DeploymentRevision",
    "DriftReference",
    "DriftWindow",
    "Event",
    "GatewayCounter",
    "IngestionJob",
    "KbChunk",
    "KbDocument",
    "KnowledgeBase",
    "LeaderLease",
    "LibraryModel",
    "Member",
    "ModelVersion",
    "Policy",
    "PolicyRevision",
    "PriceCatalogueVersion",
    "Project",
    "ProjectBudget",
    "ReplicaUsageDaily",
    "Source",
    "SourceItem",
    "UsageDaily",
    "UsageRecord",
]
