"""Every GraphQL document the Railway client sends, by operation name.

``tests/unit/test_documents.py`` validates each one against Railway's public schema, shipped
beside this module as ``schema.graphql`` (read it with :func:`schema_sdl`), so a document
that would fail against the real API fails in CI first. Optional variables are declared
nullable and left out of the request when unused: sending ``null`` tells Railway to unset a
field.
"""

from __future__ import annotations

from importlib import resources


def schema_sdl() -> str:
    """Railway's public GraphQL schema as SDL (converted from the introspection dump of the
    public railwayapp/cli repository, v5.43.1), shipped with the package."""
    return resources.files(__package__).joinpath("schema.graphql").read_text(encoding="utf-8")


# One read per pass: every service instance of the environment with its latest deployment.
LIST_SERVICES = """
query ListServices($environmentId: String!, $first: Int, $after: String) {
  environment(id: $environmentId) {
    id
    serviceInstances(first: $first, after: $after) {
      edges {
        node {
          serviceId
          serviceName
          latestDeployment {
            id
            status
            createdAt
            deploymentStopped
          }
        }
      }
      pageInfo {
        hasNextPage
        endCursor
      }
    }
  }
}
"""

# Once per service per process: the variables that carry the ownership marker.
SERVICE_VARIABLES = """
query ServiceVariables($projectId: String!, $environmentId: String!, $serviceId: String!) {
  variables(projectId: $projectId, environmentId: $environmentId, serviceId: $serviceId)
}
"""

SERVICE_CREATE = """
mutation ServiceCreate($input: ServiceCreateInput!) {
  serviceCreate(input: $input) {
    id
    name
  }
}
"""

VARIABLES_UPSERT = """
mutation VariablesUpsert($input: VariableCollectionUpsertInput!) {
  variableCollectionUpsert(input: $input)
}
"""

SERVICE_INSTANCE_UPDATE = """
mutation ServiceInstanceUpdate(
  $serviceId: String!
  $environmentId: String
  $input: ServiceInstanceUpdateInput!
) {
  serviceInstanceUpdate(serviceId: $serviceId, environmentId: $environmentId, input: $input)
}
"""

SERVICE_DEPLOY = """
mutation ServiceDeploy($environmentId: String!, $serviceId: String!) {
  serviceInstanceDeployV2(environmentId: $environmentId, serviceId: $serviceId)
}
"""

DEPLOYMENT_STOP = """
mutation DeploymentStop($id: String!) {
  deploymentStop(id: $id)
}
"""

SERVICE_DELETE = """
mutation ServiceDelete($id: String!, $environmentId: String) {
  serviceDelete(id: $id, environmentId: $environmentId)
}
"""

DEPLOYMENT_LOGS = """
query DeploymentLogs($deploymentId: String!, $startDate: DateTime, $limit: Int) {
  deploymentLogs(deploymentId: $deploymentId, startDate: $startDate, limit: $limit) {
    message
    timestamp
    severity
  }
}
"""

DEPLOYMENT = """
query Deployment($id: String!) {
  deployment(id: $id) {
    id
    status
    serviceId
    createdAt
    deploymentStopped
  }
}
"""

DOCUMENTS: dict[str, str] = {
    "ListServices": LIST_SERVICES,
    "ServiceVariables": SERVICE_VARIABLES,
    "ServiceCreate": SERVICE_CREATE,
    "VariablesUpsert": VARIABLES_UPSERT,
    "ServiceInstanceUpdate": SERVICE_INSTANCE_UPDATE,
    "ServiceDeploy": SERVICE_DEPLOY,
    "DeploymentStop": DEPLOYMENT_STOP,
    "ServiceDelete": SERVICE_DELETE,
    "DeploymentLogs": DEPLOYMENT_LOGS,
    "Deployment": DEPLOYMENT,
}

# Operations that may be sent twice without harm (a retry after a timeout is safe).
IDEMPOTENT = frozenset(
    {
        "ListServices",
        "ServiceVariables",
        "VariablesUpsert",
        "ServiceInstanceUpdate",
        "DeploymentStop",
        "ServiceDelete",
        "DeploymentLogs",
        "Deployment",
    }
)
