"""SQLAlchemy tables, one module per table. Importing this package registers them all."""

from converge.models.api_key import ApiKey
from converge.models.audit import AuditRecord
from converge.models.base import Base
from converge.models.event import Event
from converge.models.member import Member
from converge.models.project import Project

__all__ = ["ApiKey", "AuditRecord", "Base", "Event", "Member", "Project"]
