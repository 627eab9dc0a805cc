"""Every document the Railway client can send validates against Railway's public schema."""

from __future__ import annotations

import graphql
import pytest

from gardener.backends.railway.documents import DOCUMENTS, IDEMPOTENT, schema_sdl


@pytest.fixture(scope="module")
def schema() -> graphql.GraphQLSchema:
    # The dump breaks one SDL rule (a deprecated Team.id implementing Node.id); that does not
    # change what a document may ask for, so the schema is used as valid (see the test below).
    return graphql.build_schema(schema_sdl(), assume_valid=True)


def test_schema_has_only_the_known_defect() -> None:
    errors = graphql.validate_schema(graphql.build_schema(schema_sdl()))
    assert [e.message for e in errors] == [
        "Interface field Node.id is not deprecated, so implementation field Team.id must not"
        " be deprecated."
    ]


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_document_validates(schema: graphql.GraphQLSchema, name: str) -> None:
    doc = graphql.parse(DOCUMENTS[name])
    errors = graphql.validate(schema, doc)
    assert errors == [], [e.message for e in errors]
    ops = [d for d in doc.definitions if isinstance(d, graphql.OperationDefinitionNode)]
    assert len(ops) == 1
    assert ops[0].name is not None and ops[0].name.value == name


def test_the_validator_rejects_a_bad_document(schema: graphql.GraphQLSchema) -> None:
    """The check can fail: Railway's own deploymentRollback example does not validate."""
    bad = graphql.parse('mutation { deploymentRollback(id: "x") { id } }')
    assert graphql.validate(schema, bad)


def test_idempotent_operations_are_documents() -> None:
    assert IDEMPOTENT <= set(DOCUMENTS)
    assert "ServiceCreate" not in IDEMPOTENT and "ServiceDeploy" not in IDEMPOTENT
